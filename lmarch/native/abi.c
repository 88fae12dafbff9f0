/* The sizes of the structs in lmarch.h, as this compiler lays them out: Python compares them with
 * ctypes' at load and refuses a library that disagrees (a struct edited on one side only). */
#include "lmarch.h"

int64_t lmarch_sizeof_matrix(void) { return (int64_t)sizeof(lmarch_matrix); }
int64_t lmarch_sizeof_layer(void) { return (int64_t)sizeof(lmarch_layer); }
int64_t lmarch_sizeof_gpt_shape(void) { return (int64_t)sizeof(lmarch_gpt_shape); }
