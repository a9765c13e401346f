"""Cost of the decoding step's two matrix products (hidden-to-gates, output layer) with int8 arithmetic
against the bfloat16 and float32 weights decoding uses today, timed in the same process on the bundled
model's own weights: the measurement that led to `--precision int8` (captioner/decoding.py, built in
session 24 on torch.ao's dynamic quantization kernels, deprecated in this torch, with a fallback). Also timed: the two int8 products torch has
outside torch.ao, `torch._weight_int8pack_mm` (int8 weights, float32 input) and `torch._int_mm` (both int8,
the input quantized per row each call). One thread, rows = beams x images.

    python eval/int8_step_cost.py [--rows 3 48] [--reps 200]
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from bench import median_ms  # eval/bench.py, beside this script
from captioner.inference import BUNDLED_MODEL, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[3, 48], help="rows per product (3 = one image, beam 3)")
    p.add_argument("--reps", type=int, default=200, help="timed products per kind")
    args = p.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notices
    torch.set_num_threads(1)
    decoder = load_model(BUNDLED_MODEL)[0]
    for name, w in (("hidden-to-gates", decoder.lstm.weight_hh_l0), ("output layer", decoder.output_layer()[0])):
        w = w.detach().contiguous()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        q = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None)
        wq = torch.round(w / scale[:, None]).to(torch.int8)  # the same per-row int8 weights, as plain tensors
        wb = w.bfloat16()

        def int_mm(x: torch.Tensor) -> torch.Tensor:
            xs = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
            return torch._int_mm(torch.round(x / xs).to(torch.int8), wq.t()).float() * xs * scale
        for rows in args.rows:
            x = torch.randn(rows, w.shape[1])
            xb = x.bfloat16()
            f32 = median_ms(lambda: F.linear(x, w), args.reps)
            bf16 = median_ms(lambda: F.linear(xb, wb), args.reps)
            int8 = median_ms(lambda: torch.ops.quantized.linear_dynamic(x, packed), args.reps)
            pack = median_ms(lambda: torch._weight_int8pack_mm(x, wq, scale), args.reps // 4)
            imm = median_ms(lambda: int_mm(x), args.reps // 4)
            err = (torch.ops.quantized.linear_dynamic(x, packed) - F.linear(x, w)).norm() / F.linear(x, w).norm()
            print(f"{name} {tuple(w.shape)}, {rows} rows: float32 {f32 * 1e3:.0f} us, bfloat16 {bf16 * 1e3:.0f} us, "
                  f"int8 {int8 * 1e3:.0f} us ({bf16 / int8:.1f}x faster than bfloat16, {f32 / int8:.1f}x than float32; "
                  f"relative error {err:.4f}); outside torch.ao: _weight_int8pack_mm {pack * 1e3:.0f} us "
                  f"({pack / f32:.1f}x float32's time), _int_mm {imm * 1e3:.0f} us ({imm / f32:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
