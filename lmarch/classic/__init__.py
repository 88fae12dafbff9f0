"""Language models and word representations from before transformers, none of them deep
networks: n-gram models with Kneser-Ney smoothing, TF-IDF, word2vec and GloVe.

They are the baselines the neural families are measured against (``lmarch compare``), each
written out from its paper and checked against the library people use for it (nltk, scikit-learn,
gensim).
"""
