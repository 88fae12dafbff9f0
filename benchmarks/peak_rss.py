"""Peak resident memory of this process, for the benchmarks that measure one step in a fresh
process (``memory.py``, ``finetune.py``): read ``VmRSS`` / ``VmHWM`` and reset the peak."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset this process's peak resident set to the current one (Linux >= 4.0; this resets
    getrusage's maximum too). False where the kernel does not offer it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
