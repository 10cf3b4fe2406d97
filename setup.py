"""Build of ddfast: the pybind11 CPU module ddfast._C (C++17, OpenMP) and, when a CUDA
toolkit is found, ddfast._C_cuda from csrc/*.cu. Neither links libtorch, so building needs
no torch. Triton kernels (kernels/) are installed as the package ddfast.kernels."""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# csrc/*.cpp make ddfast._C, except *_cuda.cpp, which bind the csrc/*.cu kernels in ddfast._C_cuda.
CPU_SOURCES = sorted(f for f in glob.glob("csrc/*.cpp") if not f.endswith("_cuda.cpp"))
CUDA_MODULE_SOURCES = sorted(glob.glob("csrc/*_cuda.cpp"))
CUDA_KERNELS = sorted(glob.glob("csrc/*.cu"))
CUDA_ARCHS = ("80", "86", "89", "90", "100", "120")


def cuda_archs():
    """SM versions to build for: DDFAST_CUDA_ARCHS (e.g. "90" or "80,90") or CUDA_ARCHS; PTX of the newest is added."""
    given = os.environ.get("DDFAST_CUDA_ARCHS", "").replace(";", ",").replace(" ", ",")
    archs = tuple(a.strip().replace(".", "") for a in given.split(",") if a.strip()) or CUDA_ARCHS
    bad = [a for a in archs if not a.isdigit()]
    if bad:
        raise SystemExit(f"DDFAST_CUDA_ARCHS: expected SM numbers like '80,90', got {given!r}")
    return archs


def find_cuda_home():
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then nvcc's own
    directory (the nvcc on PATH may be a wrapper script, so it comes last)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def openmp_flags():
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


class BuildExt(build_ext):
    """Compiles each .cu with nvcc into an object linked into ddfast._C_cuda; skips that
    module, saying why, when no toolkit is found or DDFAST_NO_CUDA=1."""

    def build_extensions(self):
        for ext in list(self.extensions):
            if ext.name == "ddfast._C_cuda" and not self._prepare_cuda(ext):
                self.extensions.remove(ext)
        super().build_extensions()
        if not self.inplace:
            self._copy_beside_sources()

    def _copy_beside_sources(self):
        """Also put each built module beside the sources (ddfast/_C*.so), so that code run from
        the checkout (`python -m pytest`, `python bench/x.py`) imports the same compiled
        backends as the installed package."""
        here = os.path.dirname(os.path.abspath(__file__))
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            target = os.path.join(here, *ext.name.split(".")[:-1], os.path.basename(built))
            try:
                shutil.copyfile(built, target)
                print(f"ddfast: copied {ext.name} beside the sources ({target})")
            except OSError as exc:  # a read-only checkout: the installed package still has it
                print(f"ddfast: could not copy {ext.name} beside the sources: {exc}")

    def _prepare_cuda(self, ext):
        if os.environ.get("DDFAST_NO_CUDA") == "1":
            print("ddfast: DDFAST_NO_CUDA=1, not building ddfast._C_cuda")
            return False
        home = find_cuda_home()
        if home is None:
            print("ddfast: no CUDA toolkit found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc "
                  "on PATH), not building ddfast._C_cuda; the CUDA backend will be unavailable")
            return False
        nvcc = os.path.join(home, "bin", "nvcc")
        gencode = []
        archs = cuda_archs()
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        newest = max(archs, key=int)
        gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        objdir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objdir, exist_ok=True)
        objects = []
        for src in CUDA_KERNELS:
            obj = os.path.join(objdir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--cudart=static", "--threads", "0", "-Icsrc"] + gencode
            print("ddfast: " + " ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.include_dirs = list(ext.include_dirs or []) + [os.path.join(home, "include")]
        libdir = os.path.join(home, "lib64")
        if not os.path.isdir(libdir):
            libdir = os.path.join(home, "lib")
        ext.library_dirs = list(ext.library_dirs or []) + [libdir]
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "pthread", "dl"]
        return True


omp_compile, omp_link = openmp_flags()
native = ["-march=native"] if os.environ.get("DDFAST_NATIVE") == "1" else []
ext_modules = [
    Pybind11Extension(
        "ddfast._C",
        CPU_SOURCES,
        include_dirs=["csrc"],
        depends=sorted(glob.glob("csrc/*.h")),
        cxx_std=17,
        extra_compile_args=["-O3"] + omp_compile + native,
        extra_link_args=omp_link,
    )
]
if CUDA_KERNELS:
    ext_modules.append(
        Pybind11Extension(
            "ddfast._C_cuda",
            CUDA_MODULE_SOURCES,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(
    packages=["ddfast", "ddfast.kernels", "ddfast.paper"],
    py_modules=["_ddfast_cli"],    # the console command's entry, outside the package (see its docstring)
    package_data={"ddfast": ["py.typed"]},
    package_dir={"ddfast": "ddfast", "ddfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
