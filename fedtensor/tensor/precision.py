"""Matrix-product precision of the codec's numerics.

On GPUs JAX's default float32 product is TF32 (a 10-bit mantissa, ~1e-3 relative error): enough for a
neural net, not for a codec whose quantisation indices, max-error check and decoded voxels must agree
between an encoder and a decoder on different backends. Every transform product asks for true fp32.
"""

import jax

FP32 = jax.lax.Precision.HIGHEST
