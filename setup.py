"""Build of dqgemm: a pure-Python package plus an optional CUDA extension, dqgemm._C.

The extension is a plain pybind11 module compiled by nvcc with the static CUDA runtime;
it links no libtorch, so one build keeps working across torch upgrades.

Environment variables:
  DQGEMM_CUDA_ARCHS   semicolon list of targets, default "80;90a" (e.g. "90a" for a quick
                      Hopper-only build). "90a" enables wgmma/setmaxnreg code paths.
  DQGEMM_NO_CUDA=1    skip the extension even when nvcc is present.
  DQGEMM_NVCC_THREADS parallel nvcc jobs (default: CPU count).
  DQGEMM_NVCC_FLAGS   extra nvcc flags for the .cu files, split on spaces (e.g.
                      "-Xptxas -v" to print registers and spills, or a -D switch to time
                      a variant of a kernel).
  CUDA_HOME           where to look for bin/nvcc (else PATH, then /usr/local/cuda).
  DQGEMM_OBJ_CACHE    a folder of compiled .cu objects keyed by a hash of the sources, the
                      csrc headers, the flags and the nvcc version (like ccache): objects
                      found there are reused, new ones are stored. The .cu objects do not
                      depend on the Python version, so a cache filled on one machine saves
                      the long nvcc runs on another of the same architecture.

Without nvcc (or pybind11) the package installs without the extension and
`python -m dqgemm info` says so.
"""

import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "80;90a"


def find_nvcc():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def gencode_flags(archs):
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def cuda_archs():
    raw = os.environ.get("DQGEMM_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace("sm_", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise SystemExit(f"DQGEMM_CUDA_ARCHS: expected targets such as '80;90a', got {raw!r}")
    return archs


def _cache_key(nvcc, src, cmd_flags):
    """Hash of what determines a .cu object: source, every csrc header, flags, nvcc."""
    digest = hashlib.sha256()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update(" ".join(f for f in cmd_flags if not f.startswith("-I")).encode())
    for path in [src] + sorted(glob.glob(os.path.join(CSRC, "*.h")) +
                               glob.glob(os.path.join(CSRC, "*.cuh"))):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()[:24]


def _compile(job, cache_dir):
    src, obj, cmd, key = job
    cached = os.path.join(cache_dir, f"{os.path.basename(src)}.{key}.o") if cache_dir else None
    if cached and os.path.isfile(cached):
        shutil.copyfile(cached, obj)
        return job, subprocess.CompletedProcess(cmd, 0, "", f"dqgemm: reused {cached}\n")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if cached and result.returncode == 0:
        os.makedirs(cache_dir, exist_ok=True)
        shutil.copyfile(obj, cached)
    return job, result


class NvccBuildExt(build_ext):
    """Compiles csrc/*.cu and csrc/*.cpp with nvcc and links one shared module."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        import pybind11

        archs = cuda_archs()
        out_path = self.get_ext_fullpath(ext.name)
        tmp = os.path.join(self.build_temp, "dqgemm_objs")
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        includes = [CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
        common = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                  f'-DDQGEMM_COMPILED_ARCHS="{";".join(archs)}"']
        common += [f"-I{p}" for p in includes]
        jobs = []
        for src in ext.sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj] + common
            key = None
            if src.endswith(".cu"):
                cmd += gencode_flags(archs) + ["--expt-relaxed-constexpr", "-lineinfo"]
                cmd += os.environ.get("DQGEMM_NVCC_FLAGS", "").split()
                key = _cache_key(nvcc, src, cmd[5:])
            jobs.append((src, obj, cmd, key))
        threads = int(os.environ.get("DQGEMM_NVCC_THREADS", os.cpu_count() or 1))
        print(f"dqgemm: compiling {len(jobs)} sources with {nvcc} for sm_{', sm_'.join(archs)}",
              flush=True)
        cache_dir = os.environ.get("DQGEMM_OBJ_CACHE") or None
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(pool.map(
                lambda job: _compile(job, cache_dir if job[3] else None), jobs))
        failed = [(job, res) for job, res in results if res.returncode != 0]
        for job, res in results:
            if res.stderr.strip() and res.returncode == 0:
                print(res.stderr, file=sys.stderr)
        if failed:
            for (src, _, cmd, _), res in failed:
                print(f"dqgemm: nvcc failed on {src}:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}",
                      file=sys.stderr)
            raise SystemExit("dqgemm: CUDA extension build failed (see nvcc output above)")
        link = [nvcc, "-shared", "-cudart", "static", "-o", out_path] + [j[1] for j in jobs]
        subprocess.run(link, check=True)


def extension_modules():
    if os.environ.get("DQGEMM_NO_CUDA", "0") not in ("", "0"):
        print("dqgemm: DQGEMM_NO_CUDA is set: building without the CUDA extension")
        return []
    if find_nvcc() is None:
        print("dqgemm: nvcc not found: building without the CUDA extension "
              "(set CUDA_HOME or put nvcc on PATH to build it)")
        return []
    try:
        import pybind11  # noqa: F401
    except ImportError:
        print("dqgemm: pybind11 not importable: building without the CUDA extension")
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) +
                     glob.glob(os.path.join("csrc", "*.cpp")))
    return [Extension("dqgemm._C", sources=sources)]


setup(
    ext_modules=extension_modules(),
    cmdclass={"build_ext": NvccBuildExt},
)
