"""Every Triton kernel of the GPU path compiles for an H100 (sm_90), here without a GPU: Triton's own compiler and
ptxas build each kernel, in the configurations the engine launches, into a cubin. Under the interpreter (the CPU
tests) a kernel's arithmetic is checked but not whether it compiles; this catches what only a GPU would have.

The compiler runs in a child process: the tests' process runs Triton interpreted (conftest.py), and @triton.jit
reads that setting when a kernel is defined."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size


def kernels() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, pointer element types (default bf16), constexprs, options) of each launch configuration."""
    from engine.attention import triton_cache, triton_decode, triton_prefill, triton_shared
    from engine import triton_linear, triton_norm
    table = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "starts_ptr": "*i32"}
    graph_table = {name: "*i64" for name in table}  # a CUDA graph's inputs are int64 (cuda_graphs.StepGraphs)
    parts = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    decode = dict(BLOCK_SIZE=16, HS=64, BLOCK_N=triton_decode.BLOCK_N)
    out = [(f"decode partial={p} after_prefix={a} {ints['starts_ptr']}", triton_decode._decode_kernel, ints | parts,
            decode | dict(PARTIAL=p, AFTER_PREFIX=a), dict(num_warps=triton_decode.NUM_WARPS, num_stages=2))
           for p, a in ((False, False), (True, False), (True, True)) for ints in (table, graph_table)]
    out.append(("combine", triton_decode._combine_kernel, parts, dict(HS=64, SPLITS_POW2=8), dict(num_warps=1)))
    out += [(f"shared prefix {ints}", triton_shared._shared_prefix_kernel,
             {name: ints for name in ("shared_table_ptr", "shared_len_ptr", "shared_lens_ptr")} | parts,
             dict(BLOCK_SIZE=16, HS=64, BLOCK_M=triton_shared.BLOCK_M, BLOCK_N=triton_shared.BLOCK_N,
                  SPLIT_TOKENS=256, PRECISION="tf32"), dict(num_warps=4, num_stages=2)) for ints in ("*i32", "*i64")]
    out += [(f"prefill {ints}", triton_prefill._prefill_kernel,
             {name: ints for name in ("block_tables_ptr", "context_lens_ptr", "query_start_ptr", "work_ptr")},
             dict(BLOCK_SIZE=16, HS=64, BLOCK_M=64, BLOCK_N=triton_prefill.BLOCK_N, PRECISION="tf32"),
             dict(num_warps=4, num_stages=2)) for ints in ("*i32", "*i64")]
    out.append(("write kv", triton_cache._write_kv_kernel, {"slots_ptr": "*i64"}, dict(WIDTH=1024, BLOCK=1024),
                dict(num_warps=4)))
    out.append(("add + layer norm", triton_norm._add_layer_norm_kernel, {}, dict(C=1024, BLOCK=1024),
                dict(num_warps=4)))
    for name, (m, n, k, split, warps), gelu in (
            *((f"invariant up to {most} rows, K {k}", triton_linear.invariant_tiling(most or 2048, k), False)
              for most, _ in triton_linear.INVARIANT_TILES for k in (1024, 4096)),
            ("1 row", triton_linear.few_rows_config(1, 4096, 1024), True),
            ("16 rows", triton_linear.few_rows_config(16, 1024, 4096), False)):
        out.append((f"product, {name} tiling", triton_linear._linear_kernel,
                    {"part_ptr": "*fp32", "tickets_ptr": "*i32"},
                    dict(HAS_BIAS=True, GELU=gelu, SPLIT_K=split, K_SHARE=1024, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k,
                         PRECISION="tf32", PREFETCH_LINES=16 if m == 16 else 0, LINE=64),
                    dict(num_warps=warps, num_stages=3)))
    # as an H100 launches them: with programmatic dependent launch (engine/pdl.py)
    return [(name, kernel, pointers, constexprs | dict(PDL=True), options | dict(launch_pdl=True))
            for name, kernel, pointers, constexprs, options in out]


def compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    for name, kernel, pointers, constexprs, options in kernels():
        signature = {}
        for param in kernel.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
            elif param.name.endswith("_ptr"):
                signature[param.name] = pointers.get(param.name, "*bf16")
            else:  # the scales and eps are floats; every other plain argument an int
                signature[param.name] = "fp32" if param.name in ("qk_scale", "eps") else "i32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget(*H100), options=options)
        print(f"{name}: {len(compiled.asm['cubin'])} bytes of sm_90 code, {compiled.metadata.shared} bytes of shared "
              f"memory", flush=True)


def test_every_gpu_kernel_compiles_for_an_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env | {"PYTHONPATH": root}, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bytes of sm_90 code") == len(kernels()), done.stdout


if __name__ == "__main__":
    compile_all()
