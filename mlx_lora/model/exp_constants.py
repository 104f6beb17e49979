"""The constants of the one exp scheme both CPU kernel modules compute, cpu_kernels' fast_exp (an
MLX graph) and decode_kernels' `_exp` (a numba loop): Cody-Waite reduction by ln 2, a degree-7
Taylor polynomial, 2**n written as exponent bits. Here, below both, so that neither module imports
the other (cpu_kernels hands decoding to decoder.py, which imports decode_kernels)."""

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so that n * LN2_HI is exact
# Below this exp is under float32's smallest normal number (1.18e-38): 0, never a subnormal. Intel
# cores take a microcode assist on every subnormal operand, so the ~1e-38 a masked attention score
# gave (and the subnormal probabilities it divided into) made our attention 9x slower than MLX's
# on a Xeon (14.2 against 1.6 ms for 4 x 9 heads x 71 tokens causal); AMD cores barely notice.
EXP_LOW, EXP_HIGH = -87.0, 88.0  # EXP_HIGH: the top of float32's range of normal numbers
EXP_TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040)  # |r| <= ln2/2: error < 1e-7
