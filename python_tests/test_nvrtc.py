"""The NVRTC backend (dspark_kernels.nvrtc, docs/building.md#cuda-without-a-toolkit).

Without a GPU (CI):
* the compile command for sm_90a compiles, reports registers / spills / shared
  memory, and fails on a compile error or a spill;
* the disk cache: the key covers every input, entries are written atomically, a
  corrupt or stale entry is rebuilt, two processes compiling at once both succeed;
* the launch plans of nvrtc/plans.py agree with dspark/launch.h as the compiled
  extension runs it (dspark_launch_plan), and the ctypes parameter blocks agree
  with the C++ layout NVRTC computes;
* the registry: CUDA key priority extension > nvrtc > triton > reference (with a
  warning), backends() reports nvrtc, DSPARK_NO_NVRTC=1 turns it off.

On a GPU (marked cuda; bench/gpu_check.sh): every nvrtc op equals the compiled
extension and the reference exactly, cold compile and warm cache times are
printed, and a CUDA graph captures and replays with new inputs.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import _backend, _registry, nvrtc
from dspark_kernels.nvrtc import _compiler, _programs, _source, plans

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NVRTC_OK = nvrtc.importable()
needs_nvrtc = pytest.mark.skipif(not NVRTC_OK, reason=f"no libnvrtc / cuda-bindings ({nvrtc.unavailable_reason()})")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    return tmp_path / "nvrtc"


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


# ---------------------------------------------------------------------- the compile command


@needs_nvrtc
def test_compile_command_sm90a(tmp_path):
    """The CLI on the programs without dtypes plus one tree instance (CI runs all of them
    in .ci/run): exit 0, every exported kernel in the table, no spill."""
    cmd = [sys.executable, "-m", "dspark_kernels.nvrtc", "compile", "--arch", "sm_90a", "--program", "random_words",
           "--program", "kv", "--program", "schedule_verify_lens", "--program", "verify_tree_F32_F32"]
    proc = subprocess.run(cmd, env=_env(DSPARK_CACHE=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for kernel in ("rw::random_words_kernel", "kv::commit_kernel", "kv::release_kernel", "kv::window_commit_kernel",
                   "kv::state_select_kernel", "sched::survival_kernel", "sched::rank_kernel", "sched::finish_kernel",
                   "vt::tree_kernel<vt::F32, vt::F32>"):
        row = next((line for line in out.splitlines() if kernel in line), None)
        assert row is not None, f"{kernel} missing from\n{out}"
        regs, stack, spills, smem = row.split()[-4:]
        assert int(regs) > 0 and spills == "0/0" and int(smem) >= 0, row
    assert "OK: no errors, no spills" in out


@needs_nvrtc
def test_compile_command_fails_on_error_and_spill(cache, monkeypatch, capsys):
    broken = _compiler.Program("broken", '#include "dspark/philox.h"\n__global__ void k() { undeclared(); }\n',
                               ("k",))
    monkeypatch.setattr(_programs, "all_programs", lambda: [broken])
    from dspark_kernels.nvrtc import __main__ as cli
    assert cli.compile_all(["sm_90a"], use_cache=True) == 1
    assert "ERROR broken" in capsys.readouterr().out
    # A spill: a kernel whose live state cannot fit a 32-register budget.
    spilling = _compiler.Program(
        "spilling", "__global__ void __launch_bounds__(1024, 2) k(float* x) {\n"
        "  float a[64];\n  for (int i = 0; i < 64; ++i) a[i] = x[i * threadIdx.x];\n"
        "  float s = 0; for (int j = 0; j < 64; ++j) for (int i = 0; i < 64; ++i) s += a[i] * a[(i * j) & 63];\n"
        "  x[threadIdx.x] = s;\n}\n", ("k",))
    monkeypatch.setattr(_programs, "all_programs", lambda: [spilling])
    assert cli.compile_all(["sm_90a"], use_cache=False) == 1
    assert "SPILL" in capsys.readouterr().out


def test_resource_usage_parses_ptxas_report():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 2048 bytes smem, 392 bytes cmem[0]\n")
    (u,) = _compiler.resource_usage(log)
    assert (u.kernel, u.registers, u.stack, u.spill_stores, u.spill_loads, u.smem, u.cmem0) == (
        "_Z1kv", 32, 8, 4, 8, 2048, 392)


def test_programs_cover_every_op_and_dtype_pair():
    names = [p.name for p in _programs.all_programs()]
    assert len(names) == len(set(names)) == 3 + 9 + 9
    specs = {name: spec for name, spec in _registry.REGISTRY.items() if spec.nvrtc is not None}
    assert set(specs) == set(_programs.OPS)


# ---------------------------------------------------------------------- the cache


def _fake_compiler(monkeypatch, calls):
    def fake(program, arch):
        calls.append((program.name, arch))
        return b"\x7fELF" + program.name.encode() * 8, {k: f"_sym_{i}" for i, k in enumerate(program.kernels)}, "log"

    monkeypatch.setattr(_compiler, "_compile_uncached", fake)
    monkeypatch.setattr(_compiler, "nvrtc_version", lambda: (13, 0))


def test_cache_key_covers_every_input(monkeypatch):
    monkeypatch.setattr(_compiler, "nvrtc_version", lambda: (13, 0))
    prog = _programs.fixed()["kv"]
    key = _compiler.cache_key(prog, "sm_90a")
    assert key == _compiler.cache_key(prog, "sm_90a") and re.fullmatch(r"[0-9a-f]{64}", key)
    assert key != _compiler.cache_key(prog, "sm_100a")
    assert key != _compiler.cache_key(_compiler.Program(prog.name, prog.source + "\n", prog.kernels), "sm_90a")
    assert key != _compiler.cache_key(_compiler.Program(prog.name, prog.source, prog.kernels[:1]), "sm_90a")
    monkeypatch.setattr(_compiler, "BASE_OPTIONS", _compiler.BASE_OPTIONS + ("-DX",))
    assert key != _compiler.cache_key(prog, "sm_90a")
    monkeypatch.undo()
    monkeypatch.setattr(_compiler, "nvrtc_version", lambda: (13, 1))
    assert key != _compiler.cache_key(prog, "sm_90a")
    monkeypatch.setattr(_compiler, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(_compiler, "library_version", lambda: "9.9.9")
    assert key != _compiler.cache_key(prog, "sm_90a")
    monkeypatch.setattr(_compiler, "library_version", lambda: dk.__version__)
    monkeypatch.setattr(_source, "sources_digest", lambda: "0" * 64)
    assert key != _compiler.cache_key(prog, "sm_90a")


def test_cache_hit_corrupt_and_stale_entries_are_rebuilt(cache, monkeypatch):
    calls = []
    _fake_compiler(monkeypatch, calls)
    prog = _programs.fixed()["random_words"]
    first = _compiler.compile_program(prog, "sm_90a")
    assert not first.from_cache and len(calls) == 1
    (entry,) = [p for p in cache.iterdir()]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    hit = _compiler.compile_program(prog, "sm_90a")
    assert hit.from_cache and hit.cubin == first.cubin and hit.lowered == first.lowered and len(calls) == 1

    good = entry.read_bytes()
    damaged = {
        "truncated": good[:-5],
        "flipped payload byte": good[:-3] + bytes([good[-3] ^ 1]) + good[-2:],
        "other key (stale)": good.replace(_compiler.cache_key(prog, "sm_90a").encode(), b"f" * 64, 1),
        "old format": b"dspark-nvrtc-cache 0\n" + good[len(_compiler.MAGIC):],
        "empty": b"",
    }
    for what, data in damaged.items():
        entry.write_bytes(data)
        again = _compiler.compile_program(prog, "sm_90a")
        assert not again.from_cache and again.cubin == first.cubin, what
        assert entry.read_bytes() == good, f"{what}: the rebuilt entry replaces the damaged one"
    assert len(calls) == 1 + len(damaged)


def test_cache_write_is_atomic(cache, monkeypatch):
    """The entry appears by os.replace of a temporary file in the same directory; a
    failure before the rename leaves no entry and no temporary file."""
    calls, renames = [], []
    _fake_compiler(monkeypatch, calls)
    real_replace = os.replace

    def spy(src, dst):
        renames.append((src, dst))
        assert os.path.dirname(src) == os.path.dirname(dst) and os.path.basename(src).startswith(".tmp-")
        assert not os.path.exists(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    _compiler.compile_program(_programs.fixed()["kv"], "sm_90a")
    assert len(renames) == 1 and os.path.exists(renames[0][1])

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    c = _compiler.compile_program(_programs.fixed()["random_words"], "sm_90a")  # still returns the cubin
    assert c.cubin.startswith(b"\x7fELF")
    assert sorted(p.name for p in cache.iterdir()) == [os.path.basename(renames[0][1])]


_RACE = """
import sys
from dspark_kernels.nvrtc import _compiler, _programs
c = _compiler.compile_program(_programs.fixed()["random_words"], "sm_90a")
sys.stdout.write(c.cubin.hex()[:64] + " " + str(len(c.cubin)))
"""


@needs_nvrtc
def test_two_processes_compiling_at_once(tmp_path):
    env = _env(DSPARK_CACHE=str(tmp_path), DSPARK_NO_EXTENSION="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RACE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert outs[0][0] == outs[1][0]
    files = os.listdir(tmp_path / "nvrtc")
    assert len(files) == 1 and not files[0].startswith(".tmp-"), files
    # The entry left behind is whole: a third compile is a cache hit.
    hit = subprocess.run([sys.executable, "-c", _RACE.replace("sys.stdout.write(", "sys.stdout.write(str(c.from_cache) or ")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert hit.stdout.startswith("True"), hit.stderr


# ---------------------------------------------------------------------- one copy of the launch plans


def test_constants_come_from_launch_h():
    with open(os.path.join(_source.include_dir(), "dspark", "launch.h"), encoding="utf-8") as f:
        text = f.read()
    c = _source.constants()
    for name, value in c.items():
        ns, short = name.split(".")
        assert re.search(rf"namespace {ns} \{{[^}}]*constexpr \w+ {short} = ", text, re.S), name
    assert c["vb.kStatsThreads"] == 128 and c["kv.kDefaultSmem"] == 48 * 1024 and c["rw.kMaxBlocks"] == 65536


def _plan_fn():
    if not _backend.HAS_EXTENSION:
        pytest.skip(f"needs the compiled extension ({_backend.load_error()})")
    lib = ctypes.CDLL(_backend._candidates()[0])
    try:
        fn = lib.dspark_launch_plan
    except AttributeError:
        pytest.skip("the extension predates dspark_launch_plan")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                   ctypes.c_int]

    def call(what, *args):
        inp = (ctypes.c_int64 * max(len(args), 1))(*args)
        out = (ctypes.c_int64 * 16)()
        n = fn(what.encode(), inp, len(args), out, 16)
        assert n > 0, what
        return list(out[:n])

    return call


def test_launch_plans_agree_with_the_extension():
    cpp = _plan_fn()
    for n in (1, 255, 256, 257, 10**6, 2**24 + 1, 2**40):
        assert cpp("random_words", n) == [plans.random_words_blocks(n)], n
    for R, gamma, bmax in itertools.product((0, 1, 7, 129, 4096), (1, 4, 33), (0, 5, 200)):
        w = plans.schedule_workspace(R, gamma)
        want = [w[k] for k in ("num_parts", "keys", "quant", "part_count", "part_theta", "rank", "bytes")]
        assert cpp("schedule", R, gamma, bmax) == want + [plans.schedule_max_admit(R, gamma, bmax)], (R, gamma)
    sizes = plans.record_sizes()
    keys = ("num_splits", "num_race_splits", "stat_rows", "partials", "row_filter", "desc", "race_partials", "z",
            "bytes")
    for B, N, V in itertools.product((1, 7, 64), (0, 1, 129), (1, 7, 129, 4096, 4097, 32000, 152064)):
        for flags in itertools.product((False, True), repeat=4):
            sampling, q, filt, block = flags
            q, filt, block = q and sampling, filt and sampling, block and sampling
            got = cpp("verify_block", B, N, V, sampling, q, filt, block, *sizes)
            want = plans.verify_block_plan(B, N, V, sampling, q, filt, block)
            assert got == [want[k] for k in keys], (B, N, V, flags)
    for B, V, s in itertools.product((1, 7, 64), (1, 129, 32000), (False, True)):
        assert cpp("verify_tree", B, V, s) == [plans.verify_tree_workspace_floats(B, V, s)]
    move = plans.move_size()
    for W, row in itertools.product((1, 2, 8, 16, 33, 64, 129, 1000), (0, 1, 15, 16, 17, 1000, 4096, 4097, 10**6)):
        c = plans.commit_plan(W, row)
        assert cpp("kv_commit", W, row, move) == [c["tile"], c["smem"], c["tiles"]], (W, row)
    for B in (1, 3, 4, 5, 1000):
        assert cpp("kv_release_pages", B) == [plans.release_blocks(B)]
    for row in (1, 16383, 16384, 16385, 10**7):
        assert cpp("state_select", row) == [plans.state_tiles(row)]


_LAYOUTS = ("vb.Params", "vb.BlockParams", "vb.StatPartial", "vb.RowFilter", "vb.RaceDesc", "vb.RacePartial",
            "vt.Params", "kv.CommitParams", "kv.ReleaseParams", "kv.WindowParams", "kv.StateParams", "kv.Move")


def _device_layout(names):
    """sizeof and every field offset of the named structs as NVRTC lays them out: a probe
    kernel stores them as constants, read back from its PTX (no GPU needed)."""
    from cuda.bindings import nvrtc as nv
    exprs = []
    for name in names:
        c = "dspark::" + name.replace(".", "::")
        exprs.append(f"sizeof({c})")
        exprs += [f"(unsigned long long)((const char*)&(({c}*)base)->{f} - base)" for f, _ in
                  _source.struct(name)._fields_]
    body = "\n".join(f"  out[{i}] = {e};" for i, e in enumerate(exprs))
    src = ('#include "dspark/verify_block_method.cuh"\n#include "dspark/verify_tree.cuh"\n#include "dspark/kv.cuh"\n'
           f'extern "C" __global__ void dspark_layout(unsigned long long* out, char* base) {{\n{body}\n}}\n')
    err, prog = nv.nvrtcCreateProgram(src.encode(), b"layout.cu", 0, [], [])
    opts = [b"--gpu-architecture=compute_90", b"-std=c++17", f"-I{_source.include_dir()}".encode()]
    assert int(nv.nvrtcCompileProgram(prog, len(opts), opts)[0]) == 0
    size = nv.nvrtcGetPTXSize(prog)[1]
    buf = b" " * size
    nv.nvrtcGetPTX(prog, buf)
    ptx = buf.decode(errors="replace")
    regs = dict(re.findall(r"mov\.u64\s+(%rd\d+), (\d+);", ptx))
    stores = re.findall(r"st\.global\.u64\s+\[%rd\d+(?:\+(\d+))?\], (%rd\d+);", ptx)
    values = {int(off or 0) // 8: int(regs[r]) for off, r in stores}
    return [values[i] for i in range(len(exprs))]


@needs_nvrtc
def test_parameter_blocks_match_the_device_layout():
    want = []
    for name in _LAYOUTS:
        t = _source.struct(name)
        want += [ctypes.sizeof(t)] + [getattr(t, f).offset for f, _ in t._fields_]
    assert _device_layout(_LAYOUTS) == want


def test_launchers_take_the_schema_arguments():
    """The registry calls each implementation with the schema's arguments in order: a
    schema argument added to an op must be added to its NVRTC launcher too."""
    import inspect
    for name in _programs.OPS:
        spec = _registry.REGISTRY[name]
        params = list(inspect.signature(spec.impl("nvrtc")).parameters)
        assert params == spec._names, (name, params, spec._names)


def test_launchers_set_every_parameter_field():
    """The ctypes parameter blocks follow the headers by themselves, but a field the
    launcher never sets would silently stay 0: every data member of each launch's
    parameter block is assigned in nvrtc/ops.py (as ``p.<field>``, ``d.<field>`` ...)."""
    with open(os.path.join(ROOT, "dspark_kernels", "nvrtc", "ops.py"), encoding="utf-8") as f:
        text = f.read()
    assigned = set(re.findall(r"\.(\w+)\[\w+\]", text))  # array members written element by element
    for line in text.splitlines():
        lhs, eq, _ = line.partition(" = ")
        targets = [t.strip() for t in lhs.split(",")]
        if eq and all(re.fullmatch(r"\w+\.\w+", t) for t in targets):
            assigned |= {t.split(".")[1] for t in targets}
    for name in ("vb.Params", "vb.BlockParams", "vt.Params", "kv.CommitParams", "kv.CacheDesc", "kv.ReleaseParams",
                 "kv.WindowParams", "kv.StateParams"):
        missing = [f for f, _ in _source.struct(name)._fields_ if f not in assigned]
        assert not missing, f"nvrtc/ops.py never sets {name} field(s) {missing}"


# ---------------------------------------------------------------------- registry


def test_cuda_key_priority(monkeypatch):
    kv_commit, random_words = _registry.REGISTRY["kv_commit"], _registry.REGISTRY["random_words"]
    attention = _registry.REGISTRY["draft_block_attention"]
    for nvrtc_ok, triton_ok in itertools.product((True, False), repeat=2):
        monkeypatch.setattr(_registry, "_nvrtc_importable", lambda ok=nvrtc_ok: ok)
        monkeypatch.setattr(_backend, "TRITON_IMPORTABLE", triton_ok)
        assert _registry._cuda_fallback(kv_commit, "x").__name__ == ("kv_commit_nvrtc" if nvrtc_ok else
                                                                       "kv_commit_reference")
        assert _registry._cuda_fallback(random_words, "x").__name__ == (
            "random_words_nvrtc" if nvrtc_ok else "random_words_triton" if triton_ok else "random_words_reference")
        assert _registry._cuda_fallback(attention, "x").__name__ == (
            "draft_block_attention_triton" if triton_ok else "draft_block_attention_reference")


def test_reference_fallback_warns(monkeypatch):
    monkeypatch.setattr(_registry, "_nvrtc_importable", lambda: False)
    monkeypatch.setattr(_backend, "TRITON_IMPORTABLE", False)
    monkeypatch.setattr(_backend, "_warned", set(), raising=False)
    kernel = _registry._cuda_fallback(_registry.REGISTRY["random_words"], "no extension")
    args = (torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0, 9]), 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = kernel(*args)
    assert any("running the reference" in str(w.message) for w in caught)
    assert torch.equal(got, dk.random_words(*args, backend="reference"))


def test_backends_reports_nvrtc(monkeypatch):
    for op in _registry.REGISTRY:
        assert "nvrtc" in dk.backends(op)
        assert dk.backends(op)["nvrtc"] is (torch.cuda.is_available() and NVRTC_OK
                                            and _registry.REGISTRY[op].nvrtc is not None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_registry, "_nvrtc_importable", lambda: True)
    table = dk.backends()
    assert {op for op, b in table.items() if b["nvrtc"]} == set(_programs.OPS)
    monkeypatch.setattr(_registry, "_nvrtc_importable", lambda: False)
    assert not any(b["nvrtc"] for b in dk.backends().values())


def test_nvrtc_backend_errors_name_the_reason():
    if dk.backends("kv_commit")["nvrtc"]:
        pytest.skip("nvrtc is available here")
    with pytest.raises(RuntimeError, match="backend 'nvrtc' is not available"):
        dk.random_words(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]), 0, backend="nvrtc")
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ device code"):
        _registry.dispatch(_registry.REGISTRY["draft_block_attention"], "nvrtc", *rs_attention_args())


def rs_attention_args():
    sys.path.insert(0, HERE)
    import registry_samples as rs
    args, kwargs = rs.sample("draft_block_attention")
    return _registry.REGISTRY["draft_block_attention"].ordered(args, kwargs)


def test_no_nvrtc_env_disables_it():
    code = ("import dspark_kernels as dk, dspark_kernels.nvrtc as n; "
            "print(n.importable(), n.unavailable_reason(), dk.backends('kv_commit')['nvrtc'])")
    out = subprocess.run([sys.executable, "-c", code], env=_env(DSPARK_NO_NVRTC="1"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "DSPARK_NO_NVRTC=1", "False"]


# ---------------------------------------------------------------------- on a GPU

GPU_OK = torch.cuda.is_available() and NVRTC_OK
EXT_CUDA = GPU_OK and _backend.CUDA_COMPILED


def _gpu_ops():
    sys.path.insert(0, HERE)
    import registry_samples as rs
    return rs


@pytest.mark.cuda
@pytest.mark.skipif(not GPU_OK, reason="needs a CUDA GPU and libnvrtc")
@pytest.mark.parametrize("op", _programs.OPS)
def test_gpu_nvrtc_equals_extension_and_reference(op):
    rs = _gpu_ops()
    want = rs.reference_outputs(op)
    results = {}
    for backend in ("nvrtc",) + (("cuda",) if EXT_CUDA else ()):
        args, kwargs = rs.sample(op, "cuda")
        spec = _registry.REGISTRY[op]
        out = _registry.dispatch(spec, backend, *spec.ordered(args, kwargs))
        results[backend] = [t.cpu() for t in rs.outputs(op, args, kwargs, out)]
        rs.assert_same(op, results[backend], want)
    if EXT_CUDA:
        rs.assert_same(op, results["nvrtc"], results["cuda"])


@pytest.mark.cuda
@pytest.mark.skipif(not GPU_OK, reason="needs a CUDA GPU and libnvrtc")
def test_gpu_cold_compile_and_warm_cache(tmp_path):
    """Prints the cold compile (empty cache) and warm cache-hit (new process) times."""
    code = ("import time, torch, dspark_kernels as dk; t = time.perf_counter(); "
            "x = torch.arange(1000, device='cuda'); dk.random_words(x, x, x, 3, backend='nvrtc'); "
            "torch.cuda.synchronize(); print(time.perf_counter() - t)")
    env = _env(DSPARK_CACHE=str(tmp_path))
    times = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        times.append(float(proc.stdout.split()[-1]))
    print(f"\nnvrtc random_words: cold compile + first call {times[0]:.2f} s, warm cache hit {times[1]:.2f} s")
    start = time.perf_counter()
    c = _compiler.compile_program(_programs.verify_block("F32", "F32"), "sm_90a", use_cache=False)
    print(f"nvrtc verify_block<F32, F32> cold compile {time.perf_counter() - start:.2f} s ({len(c.cubin)} bytes)")


@pytest.mark.cuda
@pytest.mark.skipif(not GPU_OK, reason="needs a CUDA GPU and libnvrtc")
@pytest.mark.parametrize("op", _programs.OPS)
def test_gpu_cuda_graph_capture_and_replay(op):
    """Capture the nvrtc op, write new inputs in place, replay: equals an eager call."""
    rs = _gpu_ops()
    spec = _registry.REGISTRY[op]
    args, kwargs = rs.sample(op, "cuda")
    ordered = spec.ordered(args, kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _registry.dispatch(spec, "nvrtc", *ordered)  # warm-up: compiles and loads the module
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _registry.dispatch(spec, "nvrtc", *ordered)
    # New inputs in place (same shapes and meaning): logits / states perturbed,
    # confidences redrawn, seeds / offsets / positions shifted.
    for name, v in zip(spec._names, ordered):
        if name in ("target_logits", "draft_logits", "states"):
            v.add_(torch.rand_like(v))
        elif name == "confidence":
            v.copy_(torch.rand_like(v))
        elif name in ("seed", "offset", "position"):
            v.add_(3)
    # The replay and an eager call on copies of the same inputs (in-place arguments
    # such as refcount / out included) must give the same bytes.
    copies = [v.clone() if isinstance(v, torch.Tensor) else v for v in ordered]
    graph.replay()
    torch.cuda.synchronize()
    got = rs.outputs(op, *spec.split(tuple(ordered)), out)
    eager = _registry.dispatch(spec, "nvrtc", *copies)
    want = rs.outputs(op, *spec.split(tuple(copies)), eager)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w), op


@pytest.mark.cuda
@pytest.mark.skipif(not GPU_OK, reason="needs a CUDA GPU and libnvrtc")
def test_gpu_torch_compile_uses_the_registered_op():
    """Without the extension the CUDA key of torch.ops.dspark.<op> is the NVRTC kernel, and
    torch.compile(fullgraph=True) traces the public function down to that op."""
    code = """
import torch, dspark_kernels as dk
assert not dk.backends("random_words")["cuda"] and dk.backends("random_words")["nvrtc"]
x = torch.arange(64, device="cuda")
f = torch.compile(lambda a: dk.random_words(a, a + 1, a, 5), fullgraph=True)
got = f(x).cpu()
want = dk.random_words(x.cpu(), x.cpu() + 1, x.cpu(), 5, backend="reference")
assert torch.equal(got, want)
lens, cu = torch.compile(lambda c, s: dk.schedule_verify_lens(c, s), fullgraph=True)(
    torch.rand(5, 3, device="cuda"), torch.linspace(10.0, 1.0, 12, device="cuda"))
assert int(cu[-1]) == int(lens.sum())
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(DSPARK_NO_EXTENSION="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# ---------------------------------------------------------------------- the launch sequences (no GPU)


@pytest.fixture
def launches(monkeypatch):
    """Runs the NVRTC launchers on CPU tensors with the driver replaced by a recorder:
    ``[(kernel, grid, block, smem, [argument bytes])]`` per call."""
    import contextlib
    from dspark_kernels.nvrtc import _driver, ops
    calls = []

    class Names(dict):
        def __missing__(self, key):
            return key

    monkeypatch.setattr(ops, "_on_device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(_driver, "functions", lambda program, dev: Names())
    monkeypatch.setattr(_driver, "allow_dynamic_smem", lambda *a: None)

    def record(fn, grid, block, smem, args, dev):
        grid = tuple(grid) if isinstance(grid, tuple) else (grid,)
        calls.append((fn.replace("dspark::", ""), grid, block, smem,
                      [ctypes.string_at(ctypes.addressof(a), ctypes.sizeof(a)) for a in args]))

    monkeypatch.setattr(_driver, "launch", record)
    return calls


def _params(name, raw):
    return _source.struct(name).from_buffer_copy(raw)


@pytest.mark.parametrize("mode", ["greedy", "sample", "filters", "block", "block_point"])
def test_verify_block_launch_sequence(launches, mode):
    """The kernels, grids and block sizes of csrc/cuda/verify_block.cu's launch / launch_block."""
    from dspark_kernels.nvrtc import ops
    B, V, N = 3, 5000, 6
    g = torch.Generator().manual_seed(0)
    sampling = mode != "greedy"
    kw = dict(target_logits=torch.randn(N + B, V, generator=g), draft_tokens=torch.randint(0, V, (N,), generator=g),
              cu_num_draft=torch.tensor([0, 2, 2, 6], dtype=torch.int32),
              draft_logits=None if mode in ("greedy", "block_point") else torch.randn(N, V, generator=g),
              temperature=torch.ones(B) if sampling else None, top_k=torch.tensor([5, 0, 7]) if mode == "filters"
              else None, seed=torch.arange(B), offset=torch.zeros(B, dtype=torch.int64), max_num_draft=4,
              method="block" if mode.startswith("block") else "token")
    out, acc = ops.verify_block(**kw)
    assert out.shape == (B, 5) and bool((out == -1).all()) and acc.shape == (B,)
    c, T = plans.C(), N + B
    stat_rows = T + (N if kw["draft_logits"] is not None and sampling else 0)
    splits, race_splits = plans.ceil_div(V, c["vb.kStatsSplit"]), plans.ceil_div(V, c["vb.kRaceSplit"])
    want = [("stats_kernel", (stat_rows, splits), c["vb.kStatsThreads"])]
    if sampling:
        want.append(("mass_kernel", (stat_rows, splits), c["vb.kStatsThreads"]))
    if mode == "filters":
        want.append(("filter_kernel", (stat_rows,), c["vb.kFilterThreads"]))
    if mode == "block":
        want.append(("block_z_kernel", (T,), c["vb.kBlockZThreads"]))
    if mode.startswith("block"):
        want.append(("block_walk_kernel", (B,), c["vb.kBlockWalkThreads"]))
    else:
        want.append(("walk_kernel", (B,), c["vb.kWalkThreads"]))
    if sampling:
        want += [("race_kernel", (B, race_splits), c["vb.kRaceThreads"]), ("finish_kernel", (B,), c["vb.kFinishThreads"])]
    got = [(k.split("<")[0].replace("vb::", ""), grid, block) for k, grid, block, _, _ in launches]
    assert got == want
    assert all(k.endswith("<vb::F32, vb::F32>") for k, *_ in launches if "finish" not in k)
    raw = launches[0][4][0]
    p = _params("vb.Params", raw)
    assert (p.B, p.N, p.T, p.V, p.max_num_draft, p.num_splits, p.num_race_splits) == (B, N, T, V, 4, splits,
                                                                                      race_splits)
    assert p.draft_kind == (1 if kw["draft_logits"] is not None else 0) and p.target_stride == V
    assert p.target == kw["target_logits"].data_ptr() and p.output_tokens == out.data_ptr()
    assert (p.temperature is not None) == sampling and (p.row_filter is not None) == (mode == "filters")
    assert p.top_k.is_int64 == (1 if mode == "filters" else 0) and p.cu.is_int64 == 0
    plan = plans.verify_block_plan(B, N, V, sampling, stat_rows > T, mode == "filters", mode.startswith("block"))
    assert p.desc - p.partials == plan["desc"] and (not sampling or p.race_partials - p.partials ==
                                                    plan["race_partials"])


def test_kv_and_small_op_launch_sequences(launches):
    from dspark_kernels.nvrtc import ops
    c = plans.C()
    # kv_commit: 100 caches (two launches of at most kMaxCachesPerLaunch), rows of 6 fp16.
    caches = [torch.zeros(4, 2, 6, dtype=torch.float16) for _ in range(100)]
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    ops.kv_commit(caches, table, 2, torch.tensor([1, 0]), torch.tensor([[0, 1, 2], [0, -1, -1]]),
                  torch.tensor([3, 1]))
    plan = plans.commit_plan(3, 12)
    assert [(k, g, b, s) for k, g, b, s, _ in launches] == [
        ("kv::commit_kernel", (2, plan["tiles"], 96), c["kv.kCommitThreads"], plan["smem"]),
        ("kv::commit_kernel", (2, plan["tiles"], 4), c["kv.kCommitThreads"], plan["smem"])]
    first, second = (_params("kv.CommitParams", call[4][0]) for call in launches)
    assert (first.num_caches, first.write_new_len, second.num_caches, second.write_new_len) == (96, 1, 4, 0)
    assert first.caches[0].row_bytes == 12 and first.caches[0].vec == 4 and first.caches[0].page_stride == 24
    assert second.caches[3].base == caches[99].data_ptr() and first.tile_bytes == plan["tile"]
    assert (first.B, first.P, first.W, first.page_size, first.accept_path.is_int64) == (2, 2, 3, 2, 1)
    launches.clear()
    ops.kv_release_pages(table, torch.tensor([1, 0]), torch.tensor([4, 3]), 2, torch.ones(4, dtype=torch.int64))
    ops.window_commit(torch.zeros(2, 3, 5), torch.zeros(4, 5), torch.tensor([0, 1, 4]), torch.tensor([0, 1, 2, 3]),
                      torch.ones(4, dtype=torch.bool))
    ops.state_select(torch.zeros(2, 3, 5000), torch.tensor([0, 2]), torch.zeros(2, 5000))
    ops.random_words(torch.arange(300), torch.arange(300), torch.arange(300), 9)
    ops.schedule_verify_lens(torch.rand(5, 3), torch.linspace(10.0, 1.0, 12))
    assert [(k, g, b) for k, g, b, _, _ in launches] == [
        ("kv::release_kernel", (1,), c["kv.kReleaseWarps"] * 32),
        ("kv::window_commit_kernel", (4,), c["kv.kWindowThreads"]),
        ("kv::state_select_kernel", (2, 2), c["kv.kStateThreads"]),
        ("rw::random_words_kernel", (2,), c["rw.kThreads"]),
        ("sched::survival_kernel", (1,), c["sched.kThreads"]),
        ("sched::rank_kernel", (1,), c["sched.kThreads"]),
        ("sched::finish_kernel", (1,), c["sched.kFinishThreads"])]
    w = _params("kv.WindowParams", launches[1][4][0])
    assert (w.B, w.W, w.T, w.row_bytes, w.vec, w.keep.elem_bytes, w.window_stride1) == (2, 3, 4, 20, 4, 1, 20)
    st = _params("kv.StateParams", launches[2][4][0])
    assert (st.S, st.row_bytes, st.states_stride1, st.out_stride0) == (3, 20000, 20000, 20000)
    rw_args = launches[3][4]
    assert int.from_bytes(rw_args[3], "little") == 9 and int.from_bytes(rw_args[5], "little") == 300


def test_verify_tree_launch(launches):
    from dspark_kernels.nvrtc import ops
    g = torch.Generator().manual_seed(3)
    target = torch.randn(6, 11, generator=g).to(torch.bfloat16)
    acc_path, acc, out = ops.verify_tree(target, torch.tensor([1, 2, 3, 4]), torch.tensor([-1, -1, 1, -1]),
                                         torch.tensor([0, 3, 4]), None, torch.rand(4, 11, generator=g), None,
                                         None, None, torch.tensor([1, 2]), torch.tensor([0, 0]), 2)
    ((k, grid, block, smem, (raw,)),) = launches
    assert (k, grid, block, smem) == ("vt::tree_kernel<vt::BF16, vt::F32>", (2,), plans.C()["vt.kThreads"], 0)
    p = _params("vt.Params", raw)
    assert (p.B, p.N, p.V, p.max_depth, p.draft_kind, p.workspace) == (2, 4, 11, 2, 2, None)
    assert p.parents.is_int64 == 1 and p.accept_path == acc_path.data_ptr()
