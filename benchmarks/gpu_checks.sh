#!/usr/bin/env bash
# The GPU checks of issue 13 as one command for a lent machine (benchmarks/RESULTS.md records what it printed):
#   CUDA tests, the toy pipeline on CUDA in fp32 (fast-path sets equal the reference's; also with shared rows),
#   Gemma-2-2B with 65k JumpReLU SAEs, Llama-3.1-8B with 131k SAEs in host placement (peak GPU memory).
# Usage, from the repository root:
#   OUT=DIR bash benchmarks/gpu_checks.sh [all|batch|rows|compile|lockstep|profile|stage2|llama]
# Every pipeline_gpu.py line also runs the once-per-run work (Stage 3's FM dataset and training, the CE texts) and
# the per-prompt analyses. The compile and lockstep lines take AdvBench's size (520 + 520 FM prompts, 100 CE texts),
# since their AdvBench-520 estimate counts that work; the others measure per-prompt cost or memory and take 16 or
# 64 FM prompts and 8 CE texts. The limits are untried on a GPU since these were added; each mode's sum stays
# under the device tool's 10 minutes per command.
#   batch (~9 min at most): Gemma-2-2B/65k with 4 and 16 prompts in lockstep (--prompt-batch) and the one-prompt baseline
#   rows (~5 min at most): Stage 2 alone at Gemma-2-2B/65k shapes, shared rows vs one row per set (bench_stages.py
#   --rows-off; how much sharing saves depends on how often the random SAEs' latents fire), then one Gemma prompt
#   with the sweeps' K values in batches of 5 (the default) and of 20 (--k-chunk; 32 rows per generation batch)
#   compile (~10 min at most): the compiled-generation CUDA test, then Gemma-2-2B/65k prompts with
#   --compile-generation inductor (3: compile time lands in the first prompt, the later are warm; the eager
#   reference forms on the first, for the ratio) and with eager generation (2)
#   lockstep (~10 min at most): the compiled-generation CUDA test, then Gemma-2-2B/65k, compiled, the FM's dataset
#   (520 + 520 prompts) and training once, 32 prompts (stages and per-prompt analyses) in two lockstep groups of 16
#   (the AdvBench-520 estimate), then the reference forms on one prompt (the ratio); SCORING=inductor also compiles
#   Stage 2's scoring layers (--compile-scoring; see the stage2 mode)
#   profile (~2.5 min at most): Stage 2 alone at Gemma-2-2B/65k shapes under torch.profiler (its costliest operators)
#   stage2 (~4.5 min at most): Stage 2 alone at Gemma-2-2B/65k shapes, eager and through compiled decoder layers
#   (--compile-scoring inductor), each with shared rows and with one row per set, every variant also profiled
#   llama (~8 min at most): Llama-3.1-8B shapes with LlamaScope's two widths: 32k SAEs on every layer held on the
#   GPU (34 GB of float32 next to the 16 GB model), then 131k held on the host in bfloat16 (their 32 distinct layers,
#   69 GB of host memory), one prompt each; peak GPU memory is the number to record
# all: LLAMA_SAE_DTYPE=bfloat16 holds the 131k set's 32 distinct layers in bfloat16 (69 GB of host memory) instead of
# one float32 matrix shared by every layer.
# A 15-minute device budget fits lockstep (SKIP_TEST=1 LOCKSTEP_S=540: the ≥ 50x ratio in one run and the
# AdvBench-520 estimate; its per-group lines and the "fast path:" line come first, and a "reference so far:" line
# (the ratio over the reference forms run so far, a lower bound) follows each reference form, so a cut run still
# reports them)
# and then, on the warm machine, stage2 with what is left (STAGE2_S=200; Stage 2 is ~1.7 s of a prompt, so
# compiled scoring moves the estimate little either way).
# Python packages the machine lacks sit as wheels in .whl/ (installed into /tmp/site first). The device machine's
# Python is 3.12 and has no pydantic: fetch them here for its Python, e.g.
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       pydantic pydantic-settings
# and name .whl in the device tool's carry (it is git-ignored). A missing package stops the script at once.
set -o pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=$(realpath -m "${OUT:-/tmp/gpu_checks}")  # absolute: the checks cd into benchmarks/
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
log="$OUT/log.txt"
# every module the benchmarks import, before any GPU time is spent on a run that would die at its first import
python3 -c "import pydantic, pydantic_settings, refusalscope.config, refusalscope.stages.stage3, \
refusalscope.analysis.hydra" 2>&1 | tee "$log" || { echo "missing Python packages: see above (.whl/)"; exit 1; }

# each mode's checks; the wrapper at the end adds the date and GPU lines and writes everything to $log
run_rows() {
    cd benchmarks || exit 1
    echo "== stage 2 alone, gemma-2-2b shapes, 65k, 4,800 candidates: shared rows vs one row per set"
    timeout "${STAGE2_S:-150}" python3 bench_stages.py --random-shape gemma-2-2b --device cuda --candidates 4800 \
        --batch-size 1024 --repeats 2 --sequential-taus "" --rows-off | tee "$OUT/stage2_rows.json"
    for c in 5 20; do
        echo "== gemma-2-2b, 65k, one prompt, sweeps' K values $c per generation batch"
        timeout "${CHUNK_S:-75}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda \
            --prompts 1 --reference-prompts 0 --k-chunk "$c" --batch-size 32 --fm-prompts 16 --ce-texts 8 \
            --json "$OUT/gemma65k_chunk$c.json"
    done
}

cuda_compile_test() {  # the limit in seconds unless TEST_S is set; SKIP_TEST=1 skips it (a short device budget)
    if [ -n "${SKIP_TEST:-}" ]; then echo "== CUDA test skipped (SKIP_TEST)"; return 0; fi
    echo "== CUDA test: compiled generation (inductor, CUDA graphs) gives the eager completions"
    timeout "${TEST_S:-$1}" python3 -m pytest -q -p no:cacheprovider tests/lm/test_compiled.py -k cuda
}

run_compile() {
    cuda_compile_test 80
    cd benchmarks || exit 1
    # compiled first: 3 prompts (the first pays the compile, the later are warm) and the eager reference forms on
    # the first (~100 s), so the warm ratio compares warm compiled prompts with them; then eager, 2 prompts
    echo "== gemma-2-2b, 65k, 3 prompts, --compile-generation inductor, reference on the first"
    timeout "${COMPILE_S:-400}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda \
        --prompts 3 --reference-prompts 1 --compile-generation inductor \
        --json "$OUT/gemma65k_compile_inductor.json"
    echo "== gemma-2-2b, 65k, 2 prompts, --compile-generation off"
    timeout "${EAGER_S:-110}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda \
        --prompts 2 --reference-prompts 0 --compile-generation off --json "$OUT/gemma65k_compile_off.json"
}

run_lockstep() {
    cuda_compile_test 90
    cd benchmarks || exit 1
    # two groups of 16 prompts in lockstep, compiled: the first pays the compile, the second is warm, so AdvBench-520
    # is about the setup, the first group and 31.5 more groups at the second's time; then the eager reference forms
    # on the first prompt (~100 s) for the ratio against the warm group
    echo "== gemma-2-2b, 65k, 32 prompts in lockstep groups of 16, --compile-generation inductor, reference on one"
    timeout "${LOCKSTEP_S:-500}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda \
        --prompts 32 --prompt-batch 16 --reference-prompts 1 --compile-generation inductor \
        --compile-scoring "${SCORING:-off}" --json "$OUT/gemma65k_lockstep16_compiled.json"
}

run_profile() {
    cd benchmarks || exit 1
    # where Stage 2's 1.7 s go at Gemma-2-2B shapes (the target is 1.0 s; the matmuls alone need ~0.75 s)
    echo "== stage 2 alone, gemma-2-2b shapes, 65k, 4,800 candidates, under torch.profiler"
    timeout "${PROFILE_S:-150}" python3 bench_stages.py --random-shape gemma-2-2b --device cuda --candidates 4800 \
        --batch-size 1024 --repeats 2 --sequential-taus "" --profile "$OUT/stage2_profile.txt" \
        | tee "$OUT/stage2_profile.json"
    cat "$OUT/stage2_profile.txt"
}

run_stage2() {
    cd benchmarks || exit 1
    # does fusing the element-wise work between the matmuls (norms, activations, residual adds, rotary) bring
    # Stage 2 to the 1.0 s target? Same sets are checked; the first compiled run (compiling) is reported apart
    echo "== stage 2 alone, gemma-2-2b shapes, 65k, 4,800 candidates: eager vs --compile-scoring inductor"
    timeout "${STAGE2_S:-270}" python3 bench_stages.py --random-shape gemma-2-2b --device cuda --candidates 4800 \
        --batch-size 1024 --repeats 2 --sequential-taus "" --rows-off --compile-scoring inductor \
        --profile "$OUT/stage2_profile.txt" | tee "$OUT/stage2_compiled.json"
    for f in "$OUT"/stage2_profile*.txt; do echo "== $f"; head -25 "$f"; done
}

run_batch() {
    cd benchmarks || exit 1
    # the one-at-a-time baseline first (short), then groups of 4 and 16; each prints a line per group
    echo "== gemma-2-2b, 65k, one prompt at a time (same machine)"
    timeout "${BASE_S:-120}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda \
        --prompts 2 --prompt-batch 1 --reference-prompts 0 --fm-prompts 64 --ce-texts 8 \
        --json "$OUT/gemma65k_batch1.json"
    for g in 4 16; do
        echo "== gemma-2-2b, 65k, $g prompts in lockstep"
        timeout "${GEMMA_S:-230}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda \
            --prompts "$g" --prompt-batch "$g" --reference-prompts 0 --fm-prompts 64 --ce-texts 8 \
            --json "$OUT/gemma65k_batch$g.json"
    done
}

run_all() {
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "== CUDA tests"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/stages/test_fm.py tests/saes/test_placement.py \
        tests/interventions/test_shared_rows.py tests/lm/test_compiled.py -k cuda
    cd benchmarks || exit 1
    echo "== toy on CUDA, fp32"
    timeout 45 python3 pipeline_gpu.py --toy --device cuda --dtype fp32 --json "$OUT/toy_cuda.json"
    echo "== toy on CUDA, fp32, shared rows"
    timeout 45 python3 pipeline_gpu.py --toy --device cuda --dtype fp32 --shared-rows on \
        --json "$OUT/toy_cuda_rows.json"
    echo "== toy on CUDA, fp32, SAEs held on the host in bfloat16 (--sae-dtype)"
    timeout 45 python3 pipeline_gpu.py --toy --device cuda --dtype fp32 --sae-placement host --sae-dtype bfloat16 \
        --json "$OUT/toy_cuda_host_bf16.json"
    echo "== gemma-2-2b, 65k JumpReLU SAEs on every layer"
    timeout "${GEMMA_S:-200}" python3 pipeline_gpu.py --shape gemma-2-2b --width 65536 --device cuda --prompts 2 \
        --fm-prompts 64 --ce-texts 8 --json "$OUT/gemma65k.json"
    echo "== llama-3.1-8b, 131k SAEs on every layer, host placement"
    timeout "${LLAMA_S:-160}" python3 pipeline_gpu.py --shape llama-3.1-8b --width 131072 --device cuda --prompts 1 \
        --reference-prompts 0 --fm-prompts 64 --ce-texts 8 --sae-placement host \
        --sae-dtype "${LLAMA_SAE_DTYPE:-float32}" \
        --json "$OUT/llama131k.json"
}

run_llama() {
    cd benchmarks || exit 1
    echo "== llama-3.1-8b, 32k SAEs on every layer, on the GPU"
    timeout "${LLAMA32_S:-200}" python3 pipeline_gpu.py --shape llama-3.1-8b --width 32768 --device cuda \
        --prompts 1 --reference-prompts 0 --fm-prompts 64 --ce-texts 8 --sae-placement device \
        --json "$OUT/llama32k.json"
    echo "== llama-3.1-8b, 131k SAEs on every layer, held on the host in bfloat16"
    timeout "${LLAMA_S:-260}" python3 pipeline_gpu.py --shape llama-3.1-8b --width 131072 --device cuda \
        --prompts 1 --reference-prompts 0 --fm-prompts 64 --ce-texts 8 --sae-placement host --sae-dtype bfloat16 \
        --json "$OUT/llama131k_bf16.json"
}

mode=${1:-all}
case "$mode" in rows|compile|batch|lockstep|profile|stage2|llama) ;; *) mode=all ;; esac  # as before: any other argument runs all
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "run_$mode"
    date -u
} 2>&1 | tee "$log"
