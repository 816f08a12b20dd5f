"""Build of dqgemm: a pure-Python package plus an optional CUDA extension, dqgemm._C.

The extension is a plain pybind11 module compiled by nvcc with the static CUDA runtime;
it links no libtorch, so one build keeps working across torch upgrades.

Environment variables:
  DQGEMM_CUDA_ARCHS   semicolon list of targets, default "80;90a" (e.g. "90a" for a quick
                      Hopper-only build). "90a" enables wgmma/setmaxnreg code paths.
  DQGEMM_NO_CUDA=1    skip the extension even when nvcc is present.
  DQGEMM_NVCC_THREADS parallel nvcc jobs (default: CPU count).
  CUDA_HOME           where to look for bin/nvcc (else PATH, then /usr/local/cuda).

Without nvcc (or pybind11) the package installs without the extension and
`python -m dqgemm info` says so.
"""

import concurrent.futures
import glob
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
            if src.endswith(".cu"):
                cmd += gencode_flags(archs) + ["--expt-relaxed-constexpr", "-lineinfo"]
            jobs.append((src, obj, cmd))
        threads = int(os.environ.get("DQGEMM_NVCC_THREADS", os.cpu_count() or 1))
        print(f"dqgemm: compiling {len(jobs)} sources with {nvcc} for sm_{', sm_'.join(archs)}",
              flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(pool.map(lambda job: (job, subprocess.run(
                job[2], capture_output=True, text=True)), jobs))
        failed = [(job, res) for job, res in results if res.returncode != 0]
        for job, res in results:
            if res.stderr.strip() and res.returncode == 0:
                print(res.stderr, file=sys.stderr)
        if failed:
            for (src, _, cmd), res in failed:
                print(f"dqgemm: nvcc failed on {src}:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}",
                      file=sys.stderr)
            raise SystemExit("dqgemm: CUDA extension build failed (see nvcc output above)")
        link = [nvcc, "-shared", "-cudart", "static", "-o", out_path] + [o for _, o, _ in jobs]
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
