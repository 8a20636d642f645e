"""Building the CUDA kernels of csrc/: one place turns csrc/build.json into compiler flags.

Two ways to the same library:
  ahead of time  setup.py (`QUICKLLM_BUILD_CUDA=1 pip install --no-build-isolation -e .`) builds
                 `quickllm_kernels._C` with every architecture of build.json;
  just in time   the first time a CUDA tensor reaches an op (or `python -m quickllm_kernels build`),
                 the package compiles the same sources with nvcc for the local GPU's architecture and
                 caches the library under QUICKLLM_CACHE_DIR (default ~/.cache/quickllm_kernels), keyed
                 by a hash of the sources, flags, architectures and torch/CUDA versions.

QUICKLLM_CUDA_ARCHS (e.g. "90", "80;90", "8.9 9.0", "native") overrides the architectures of both.
This module imports nothing heavy at import time: setup.py loads it by path before torch is known.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def source_root() -> Path | None:
    """The directory holding csrc/build.json: the source tree (editable installs), or the copy that a
    wheel carries inside the package (quickllm_kernels/_csrc)."""
    for root in (PACKAGE.parent, PACKAGE / "_csrc"):
        if (root / "csrc" / "build.json").is_file():
            return root
    return None


def config(root: Path | None = None) -> dict:
    root = root or source_root()
    if root is None:
        raise FileNotFoundError("csrc/build.json not found: this install carries no CUDA sources")
    return json.loads((root / "csrc" / "build.json").read_text())


def parse_archs(text: str, native: str | None = None) -> list[str]:
    """'80;90' / '8.0 9.0' / '90a' / 'native' -> ['80', '90'] (architecture suffixes kept)."""
    out = []
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        if tok == "native":
            if native is None:
                raise ValueError("QUICKLLM_CUDA_ARCHS=native needs a visible GPU")
            tok = native
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)([af]?)", tok)
        if not m:
            raise ValueError(f"QUICKLLM_CUDA_ARCHS: cannot read architecture {tok!r} (examples: 90, 8.9, 90a)")
        out.append(m.group(1) + m.group(2) + m.group(3))
    if not out:
        raise ValueError(f"QUICKLLM_CUDA_ARCHS is empty ({text!r})")
    return list(dict.fromkeys(out))


def local_arch() -> str | None:
    """The visible GPU's architecture, e.g. '90', or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def archs(cfg: dict, *, prefer_local: bool) -> list[str]:
    """QUICKLLM_CUDA_ARCHS if set; else the local GPU's (just-in-time builds) or build.json's list."""
    env = os.environ.get("QUICKLLM_CUDA_ARCHS", "").strip()
    if env:
        return parse_archs(env, native=local_arch() if "native" in env else None)
    if prefer_local:
        arch = local_arch()
        if arch is not None:
            return [arch]
    return list(cfg["cuda_archs"])


def gencode_flags(arch_list: list[str]) -> list[str]:
    """Machine code for each architecture, plus PTX of the newest so later GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_list]
    newest = arch_list[-1]
    if not newest.endswith(("a", "f")):  # arch-specific targets have no forward-compatible PTX
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include (cuBLAS, cuSPARSE, ...) and that pip-installed CUDA
    torch ships in its nvidia-* wheels rather than in the toolkit: found here so that nobody has to
    set CPATH."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for sub in sorted(Path(base).glob("cu*/include")) + sorted(Path(base).glob("*/include")):
            if sub.is_dir() and str(sub) not in dirs:
                dirs.append(str(sub))
    return dirs


def cuda_home() -> str | None:
    """The CUDA toolkit's root: CUDA_HOME/CUDA_PATH when set, else the toolkit that the `nvcc` on PATH
    belongs to (following wrapper scripts and links), else /usr/local/cuda. A root counts only when it
    has bin/nvcc and include/cuda_runtime_api.h."""
    def ok(root):
        return root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime_api.h").exists()

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if ok(os.environ[var]) else None
    found = shutil.which("nvcc")
    candidates = []
    if found:
        real = Path(found).resolve()
        candidates.append(real.parent.parent)
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            m = re.search(r"(/\S+)/bin/nvcc\b", real.read_text(errors="ignore")[:4096])
            if m:
                candidates.append(Path(m.group(1)))
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if ok(root):
            return str(root)
    return None


def nvcc_path() -> str | None:
    home = cuda_home()
    return str(Path(home) / "bin" / "nvcc") if home else None


def build_unavailable() -> str | None:
    """Why this environment cannot compile the CUDA kernels, or None when it can."""
    if source_root() is None:
        return "this install carries no CUDA sources (csrc/)"
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if nvcc_path() is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    return None


def cache_dir() -> Path:
    base = os.environ.get("QUICKLLM_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "quickllm_kernels"


# The libraries of csrc/build.json: the kernels of every architecture, and the Hopper-only kernels
# (wgmma, TMA, setmaxnreg: sm_90a machine code, which runs on sm_90 alone), a library of their own
# that holds registrations only (its `_cuda_` schemas come from the first) and loads after it.
VARIANTS = {"main": ("sources", "quickllm_kernels_cuda"), "sm90a": ("sources_sm90a", "quickllm_kernels_cuda_sm90a")}


def jit_plan(arch_list: list[str] | None = None, *, variant: str = "main", root: Path | None = None,
             cfg: dict | None = None) -> dict:
    """Sources, flags and the cache location of the just-in-time build for these architectures.
    variant "sm90a" builds build.json's `sources_sm90a` for sm_90a alone. root, cfg: another source
    tree and its build.json (tests)."""
    import torch

    root = root or source_root()
    cfg = cfg or config(root)
    key, name = VARIANTS[variant]
    if variant == "sm90a":
        arch_list = ["90a"]
    arch_list = arch_list or archs(cfg, prefer_local=True)
    sources = [str(root / s) for s in cfg[key]]
    nvcc_flags = cfg["nvcc_flags"] + gencode_flags(arch_list)
    digest = hashlib.sha256()
    # every file of csrc/ (sources, shared headers, build.json) and the schemas: any edit is a new key
    inputs = sorted(f for f in (root / "csrc").rglob("*")
                    if f.is_file() and f.suffix in (".cu", ".cuh", ".cpp", ".h", ".hpp", ".json"))
    for path in inputs + [PACKAGE / "schemas.def"]:
        digest.update(str(path.relative_to(path.parents[1] if path.name == "schemas.def" else root)).encode())
        digest.update(path.read_bytes())
    for part in (cfg["cxx_flags"], nvcc_flags, torch.__version__, torch.version.cuda, sys.version_info[:2],
                 nvcc_path()):
        digest.update(repr(part).encode())
    digest.update(repr(sources).encode())
    tag = "_".join(arch_list) + "-" + digest.hexdigest()[:16]
    directory = cache_dir() / f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-{tag}"
    include = list(dict.fromkeys([str(root), str(PACKAGE.parent)]))
    # The wheels' CUDA headers are searched after the toolkit's (-isystem, after torch's own), so they
    # only fill in what the toolkit lacks (cuBLAS, cuSPARSE, ...) and never shadow its runtime headers.
    wheel_headers = [flag for d in cuda_include_dirs() for flag in ("-isystem", d)]
    return dict(name=name, sources=sources, archs=arch_list, include=include,
                cxx_flags=cfg["cxx_flags"] + wheel_headers, nvcc_flags=nvcc_flags + wheel_headers,
                directory=directory, build_dir=directory / "build", library=directory / f"{name}.so")


def jit_build(arch_list: list[str] | None = None, *, verbose: bool = False, log=None, variant: str = "main",
              root: Path | None = None, cfg: dict | None = None) -> Path:
    """Compile (or find in the cache) the CUDA kernels for `arch_list` and return the library's path.
    The compiler runs in a child process that sees the toolkit found by cuda_home(), so neither
    CUDA_HOME nor CPATH has to be set; loading the library is the caller's job."""
    why = build_unavailable()
    if why:
        raise RuntimeError(f"cannot build the CUDA kernels: {why}")
    plan = jit_plan(arch_list, variant=variant, root=root, cfg=cfg)
    if plan["library"].is_file():
        return plan["library"]
    plan["directory"].mkdir(parents=True, exist_ok=True)
    if log:
        log(f"quickllm_kernels: compiling the CUDA kernels for sm_{', sm_'.join(plan['archs'])} "
            f"(once; cached in {plan['directory']}) ...")
    t0 = time.perf_counter()
    # ninja from this interpreter's environment even when its bin/ is not on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "CUDA_HOME": cuda_home(), "PATH": path}
    env.setdefault("MAX_JOBS", str(max(1, min(len(plan["sources"]), os.cpu_count() or 1))))
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items()}
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)] + (["--verbose"] if verbose else [])
    log_path = plan["directory"] / "build.log"
    with open(log_path, "w") as log_file:  # streamed: a build stopped from outside still leaves its log
        proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    output = log_path.read_text(errors="replace")
    built = plan["build_dir"] / plan["library"].name
    if proc.returncode != 0 or not built.is_file():
        tail = "\n".join(output.strip().splitlines()[-25:])
        raise RuntimeError(f"compiling the CUDA kernels failed (log: {plan['directory'] / 'build.log'}):\n{tail}")
    # Published by an atomic rename, after the child has loaded it: the cache never holds a partial
    # or unloadable library, whatever interrupts a build.
    tmp = plan["library"].with_name(f".{plan['library'].name}.{os.getpid()}.tmp")
    shutil.copyfile(built, tmp)
    os.replace(tmp, plan["library"])
    if log:
        log(f"quickllm_kernels: built in {time.perf_counter() - t0:.0f} s")
    return plan["library"]


def _compile(spec: dict, verbose: bool) -> None:
    """Child process of jit_build: torch reads CUDA_HOME when cpp_extension is imported, so the
    compiler is driven from a fresh interpreter. Ninja rebuilds only what changed, under
    cpp_extension's file lock, so concurrent builds of one key are safe; loading the result here
    checks that it links against this torch before the parent publishes it."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        sys.exit("ninja is not installed (pip install ninja)")
    Path(spec["build_dir"]).mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=spec["name"], sources=spec["sources"], extra_include_paths=spec["include"],
        extra_cflags=spec["cxx_flags"], extra_cuda_cflags=spec["nvcc_flags"], build_directory=spec["build_dir"],
        verbose=verbose, is_python_module=False)


def nvcc_version() -> str | None:
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else None


if __name__ == "__main__":
    _compile(json.loads(sys.argv[1]), "--verbose" in sys.argv[2:])
