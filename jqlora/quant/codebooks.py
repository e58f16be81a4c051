"""The 4-bit and 8-bit code books, exactly as bitsandbytes defines them (float32).

A code is an index into its book: a 4-bit weight stores the index of the nearest NF4 or FP4
value to ``w / absmax``; a double-quantized absmax stores the index of the nearest value of
the signed dynamic map to ``(absmax - offset) / nested_absmax``.
"""

from __future__ import annotations

import numpy as np

#: NormalFloat4: the 16 quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero
#: (QLoRA, Dettmers et al. 2023). Sorted; index = code.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

#: FP4 (E2M1 without inf/nan), normalised by 12. Bit 3 of the code is the sign, so the
#: book is NOT sorted and code 8 is +0.0 (not -0.0), as in bitsandbytes.
FP4 = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
    / np.float32(12)
).astype(np.float32)

#: ``bitsandbytes.functional.create_dynamic_map(signed=True)``: 256 increasing values from
#: -0.99296875 to 1.0 with 0.0 at index 127. Used for the 8-bit double quantization of the
#: absmax values, in blocks of 256.
DYNAMIC_SIGNED = np.array(
    [
        -0.992968738079071,
        -0.9789062738418579,
        -0.96484375,
        -0.9507812261581421,
        -0.936718761920929,
        -0.922656238079071,
        -0.9085937738418579,
        -0.89453125,
        -0.8804687261581421,
        -0.866406261920929,
        -0.852343738079071,
        -0.8382812738418579,
        -0.82421875,
        -0.8101562261581421,
        -0.796093761920929,
        -0.782031238079071,
        -0.7679687738418579,
        -0.75390625,
        -0.7398437261581421,
        -0.725781261920929,
        -0.7117187976837158,
        -0.6976562738418579,
        -0.68359375,
        -0.6695312261581421,
        -0.655468761920929,
        -0.6414062976837158,
        -0.6273437738418579,
        -0.61328125,
        -0.5992187261581421,
        -0.585156261920929,
        -0.5710937976837158,
        -0.5570312738418579,
        -0.54296875,
        -0.5289062261581421,
        -0.5148437023162842,
        -0.500781238079071,
        -0.48671871423721313,
        -0.47265625,
        -0.4585937261581421,
        -0.44453126192092896,
        -0.43046873807907104,
        -0.4164062440395355,
        -0.40234375,
        -0.3882812261581421,
        -0.37421876192092896,
        -0.36015623807907104,
        -0.3460937440395355,
        -0.33203125,
        -0.3179687261581421,
        -0.30390626192092896,
        -0.28984373807907104,
        -0.2757812738418579,
        -0.26171875,
        -0.24765624105930328,
        -0.23359374701976776,
        -0.21953125298023224,
        -0.20546874403953552,
        -0.19140625,
        -0.17734375596046448,
        -0.16328124701976776,
        -0.14921875298023224,
        -0.13515624403953552,
        -0.12109375,
        -0.10703125596046448,
        -0.09859374910593033,
        -0.09578125923871994,
        -0.09296875447034836,
        -0.09015624970197678,
        -0.08734375238418579,
        -0.08453124761581421,
        -0.08171875774860382,
        -0.07890625298023224,
        -0.07609374821186066,
        -0.07328125089406967,
        -0.07046874612569809,
        -0.0676562562584877,
        -0.06484375149011612,
        -0.062031250447034836,
        -0.05921875312924385,
        -0.05640624836087227,
        -0.053593751043081284,
        -0.05078125,
        -0.047968748956918716,
        -0.04515625163912773,
        -0.04234374687075615,
        -0.039531249552965164,
        -0.03671875223517418,
        -0.033906251192092896,
        -0.031093750149011612,
        -0.028281250968575478,
        -0.025468749925494194,
        -0.02265625074505806,
        -0.019843751564621925,
        -0.017031250521540642,
        -0.014218750409781933,
        -0.011406250298023224,
        -0.009718749672174454,
        -0.009156249463558197,
        -0.008593750186264515,
        -0.008031249977648258,
        -0.0074687497690320015,
        -0.006906250026077032,
        -0.006343749817460775,
        -0.005781250074505806,
        -0.0052187503315508366,
        -0.0046562496572732925,
        -0.004093749914318323,
        -0.0035312497057020664,
        -0.002968749962747097,
        -0.002406249986961484,
        -0.001843750011175871,
        -0.001281249918974936,
        -0.0009437500848434865,
        -0.0008312499849125743,
        -0.0007187500596046448,
        -0.0006062500760890543,
        -0.000493750034365803,
        -0.0003812500217463821,
        -0.0002687500382307917,
        -0.00015625001105945557,
        -8.874999912222847e-05,
        -6.625000241911039e-05,
        -4.374999844003469e-05,
        -2.1249998098937795e-05,
        -7.749999895168003e-06,
        -3.250000190746505e-06,
        -5.500000384017767e-07,
        0.0,
        5.500000384017767e-07,
        3.250000190746505e-06,
        7.749999895168003e-06,
        2.1249998098937795e-05,
        4.374999844003469e-05,
        6.625000241911039e-05,
        8.874999912222847e-05,
        0.00015625001105945557,
        0.0002687500382307917,
        0.0003812500217463821,
        0.000493750034365803,
        0.0006062500760890543,
        0.0007187500596046448,
        0.0008312499849125743,
        0.0009437500848434865,
        0.001281249918974936,
        0.001843750011175871,
        0.002406249986961484,
        0.002968749962747097,
        0.0035312497057020664,
        0.004093749914318323,
        0.0046562496572732925,
        0.0052187503315508366,
        0.005781250074505806,
        0.006343749817460775,
        0.006906250026077032,
        0.0074687497690320015,
        0.008031249977648258,
        0.008593750186264515,
        0.009156249463558197,
        0.009718749672174454,
        0.011406250298023224,
        0.014218750409781933,
        0.017031250521540642,
        0.019843751564621925,
        0.02265625074505806,
        0.025468749925494194,
        0.028281250968575478,
        0.031093750149011612,
        0.033906251192092896,
        0.03671875223517418,
        0.039531249552965164,
        0.04234374687075615,
        0.04515625163912773,
        0.047968748956918716,
        0.05078125,
        0.053593751043081284,
        0.05640624836087227,
        0.05921875312924385,
        0.062031250447034836,
        0.06484375149011612,
        0.0676562562584877,
        0.07046874612569809,
        0.07328125089406967,
        0.07609374821186066,
        0.07890625298023224,
        0.08171875774860382,
        0.08453124761581421,
        0.08734375238418579,
        0.09015624970197678,
        0.09296875447034836,
        0.09578125923871994,
        0.09859374910593033,
        0.10703125596046448,
        0.12109375,
        0.13515624403953552,
        0.14921875298023224,
        0.16328124701976776,
        0.17734375596046448,
        0.19140625,
        0.20546874403953552,
        0.21953125298023224,
        0.23359374701976776,
        0.24765624105930328,
        0.26171875,
        0.2757812738418579,
        0.28984373807907104,
        0.30390626192092896,
        0.3179687261581421,
        0.33203125,
        0.3460937440395355,
        0.36015623807907104,
        0.37421876192092896,
        0.3882812261581421,
        0.40234375,
        0.4164062440395355,
        0.43046873807907104,
        0.44453126192092896,
        0.4585937261581421,
        0.47265625,
        0.48671871423721313,
        0.500781238079071,
        0.5148437023162842,
        0.5289062261581421,
        0.54296875,
        0.5570312738418579,
        0.5710937976837158,
        0.585156261920929,
        0.5992187261581421,
        0.61328125,
        0.6273437738418579,
        0.6414062976837158,
        0.655468761920929,
        0.6695312261581421,
        0.68359375,
        0.6976562738418579,
        0.7117187976837158,
        0.725781261920929,
        0.7398437261581421,
        0.75390625,
        0.7679687738418579,
        0.782031238079071,
        0.796093761920929,
        0.8101562261581421,
        0.82421875,
        0.8382812738418579,
        0.852343738079071,
        0.866406261920929,
        0.8804687261581421,
        0.89453125,
        0.9085937738418579,
        0.922656238079071,
        0.936718761920929,
        0.9507812261581421,
        0.96484375,
        0.9789062738418579,
        0.992968738079071,
        1.0,
    ],
    dtype=np.float32,
)

NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


#: bitsandbytes' CPU 8-bit quantizer does not search the dynamic map: it rounds
#: ``(clamp(x, -1, 1) + 1) / 2 * 65535`` to an index into this 65,536-entry table, built once
#: from the float32 midpoints of the map (``lut[i]`` = the number of midpoints below the
#: i-th grid value). Near the midpoints, and at 0.0 (which lands on code 131, not 127), it
#: differs from the nearest code; byte equality needs the table.
DYNAMIC_LUT_SIZE = 65536


def _dynamic_lut(book: np.ndarray) -> np.ndarray:
    mids = (np.float32(0.5) * (book[:-1] + book[1:])).astype(np.float32)
    steps = np.arange(DYNAMIC_LUT_SIZE, dtype=np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * steps) / np.float32(DYNAMIC_LUT_SIZE - 1)).astype(
        np.float32
    )
    return np.searchsorted(mids, grid, side="left").astype(np.uint8)


DYNAMIC_LUT = _dynamic_lut(DYNAMIC_SIGNED)


def bucket_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds, order)``: float32 midpoints of the sorted 4-bit book and the sort order.

    ``code = order[#{bounds < x}]`` is the nearest code to ``x``; a value exactly on a
    midpoint takes the lower one. FP4 holds zero twice (codes 0 and 8): the midpoint
    between them is 0.0, so 0.0 and tiny negatives get code 0 and tiny positives code 8,
    as in bitsandbytes (whose ``torch.argsort`` puts code 0 first, like a stable sort).
    """
    book = codebook(quant_type)
    order = np.argsort(book, kind="stable")
    ordered = book[order]
    bounds = ((ordered[:-1] + ordered[1:]) / np.float32(2)).astype(np.float32)
    return bounds, order.astype(np.int32)


def codebook(quant_type: str) -> np.ndarray:
    """The 16-entry float32 code book of ``quant_type`` ("nf4" or "fp4")."""
    if quant_type == "nf4":
        return NF4
    if quant_type == "fp4":
        return FP4
    raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")


def dynamic_map(signed: bool) -> np.ndarray:
    """``bitsandbytes.functional.create_dynamic_map(signed)``: 256 increasing float32 values in
    [-1, 1] (signed) or [0, 1] (unsigned), with 0 and 1 exact.

    Seven decades ``10**-6 .. 10**-1`` each hold ``2**i`` (signed: per sign) or ``2**(i+1)``
    (unsigned) values, the midpoints of float32 ``linspace(0.1, 1, n + 1)`` scaled by the
    decade, so small magnitudes keep a relative precision that a linear map loses.
    bitsandbytes' 8-bit optimizers store the first moment on the signed map and the second
    on the unsigned one. Computed as torch computes it (a fused multiply-add per linspace
    entry, float32 products), so the values are bit-identical.
    """
    data = [0.0, 1.0]
    for i in range(7):
        n = 2 ** (i + (0 if signed else 1))
        start, end = np.float32(0.1), np.float32(1.0)
        step = np.float64(np.float32((end - start) / np.float32(n)))
        k = np.arange(n + 1)
        ramp = np.where(k < (n + 1) // 2, start + step * k, end - step * (n - k)).astype(np.float32)
        means = (ramp[:-1] + ramp[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        data += scaled.tolist() + ((-scaled).tolist() if signed else [])
    return np.sort(np.asarray(data, np.float32))


#: The unsigned dynamic map (second moments of 8-bit AdamW); 0.0 at index 0.
DYNAMIC_UNSIGNED = dynamic_map(signed=False)
