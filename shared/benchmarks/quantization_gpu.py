"""The dequantize-in-the-K-loop matmul on a real GPU (`make gpu-check`): Llama-7B's MLP up
projection (K=4096 -> N=11008, bf16 activations) at decode (M=1, 16) and prefill (M=512) sizes,
every format against torch's bf16 matmul (cuBLAS) in the same process. Checked first against
the dequantize-then-matmul reference; then timed with CUDA events in interleaved rounds.
Effective GB/s = the weight bytes as stored (codes + constants) over the time, as gpt-fast
reports it: at decode the kernel should beat bf16 by about the ratio of stored bytes.
"""

from __future__ import annotations

import torch

from kernels.quant import quantize, quantized_matmul, quantized_matmul_reference
from shared import bench
from shared.benchmarks import out_of_time, record

K, N = 4096, 11008
FORMATS = (("int8", None), ("llm.int8", None), ("int4", 128), ("nf4", 64))


def main() -> int:
    if not torch.cuda.is_available():
        print("quantization_gpu: no CUDA GPU; the CPU side is shared.benchmarks.quantization")
        return 0
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    weights = {f"{f}" + (f" g{g}" if g else ""): quantize(w, f, group_size=g) for f, g in FORMATS}
    for m in (1, 16, 512):
        if out_of_time(reserve_s=10):
            return 0
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        fns = {"bf16 (torch/cuBLAS)": lambda x=x: x @ w.t()}
        for name, qw in weights.items():
            got = quantized_matmul(x, qw).double()
            ref = quantized_matmul_reference(x.double(), qw).double()
            err = ((got - ref).norm() / ref.norm()).item()
            record("quantized_matmul vs dequantize-then-matmul (bf16, CUDA)",
                   {"M": m, "format": name, "relative error": err})
            fns[name] = lambda x=x, qw=qw: quantized_matmul(x, qw)
        t = bench.compare(fns, warmup=3, repeat=30)
        for name, tm in t.items():
            stored = 2 * N * K if name.startswith("bf16") else weights[name].nbytes()
            record("quantized matmul, Llama-7B up-projection 4096->11008 (CUDA events)",
                   {"M": m, "format": name, "median us": tm.median_s * 1e6,
                    "weight GB/s (stored bytes)": stored / tm.median_s / 1e9,
                    "tokens/s": m / tm.median_s,
                    "speed-up vs bf16": str(bench.ratio(t["bf16 (torch/cuBLAS)"], tm))})
    return 0


if __name__ == "__main__":
    main()
