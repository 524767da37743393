"""OpenBLAS for mlx on Linux CPU (FIELD-NOTES.md, "MLX speed on Linux").

The `mlx-cpu` wheel links a reference BLAS: a 1024x576x49152 matmul takes 8.5 s instead of
0.3 s. Preloading Debian's `libopenblas0-pthread` fixes it with identical results. This
module fetches the package once with `apt-get download` (no root needed to unpack it),
unpacks it under benchmarks/cache/openblas/, links the mlx wheel's own libgfortran next
to it, and returns the environment a subprocess needs (LD_PRELOAD + LD_LIBRARY_PATH).

On macOS (Metal) and wherever apt-get is missing this returns None, and mlx runs as
installed; the report says which.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "libopenblas0-pthread"


def _mlx_gfortran() -> str | None:
    try:
        dist = importlib.metadata.distribution("mlx-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    libs = Path(str(dist.locate_file("mlx_cpu.libs")))
    found = sorted(glob.glob(str(libs / "libgfortran*.so*")))
    return found[0] if found else None


def openblas_env(cache: Path) -> tuple[dict[str, str] | None, str]:
    """(environment additions, a sentence for the report)."""
    if sys.platform != "linux":
        return None, "not Linux: mlx uses its own BLAS / Metal"
    root = Path(cache).resolve() / "openblas"
    libs = sorted(glob.glob(str(root / "usr/lib/*/openblas-pthread/libopenblas.so.0")))
    if not libs:
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            return None, "apt-get/dpkg not found: mlx runs with the wheel's reference BLAS"
        root.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(["apt-get", "download", PACKAGE], cwd=root, capture_output=True,
                             text=True)
        debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
        if got.returncode != 0 or not debs:
            return None, f"apt-get download {PACKAGE} failed: mlx runs with the reference BLAS"
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
        libs = sorted(glob.glob(str(root / "usr/lib/*/openblas-pthread/libopenblas.so.0")))
        if not libs:
            return None, f"{PACKAGE} has no libopenblas.so.0: mlx runs with the reference BLAS"
    lib_dir = Path(libs[0]).parent
    gfortran = _mlx_gfortran()
    link = lib_dir / "libgfortran.so.5"
    if gfortran and not link.exists():
        link.symlink_to(gfortran)
    # The wheel's libgfortran needs its neighbours (libquadmath-*) from mlx_cpu.libs.
    search = [str(lib_dir), str(Path(gfortran).parent) if gfortran else "",
              os.environ.get("LD_LIBRARY_PATH", "")]
    env = {"LD_PRELOAD": libs[0], "LD_LIBRARY_PATH": os.pathsep.join(p for p in search if p)}
    where = Path(libs[0]).relative_to(Path(cache).resolve().parent)
    return env, f"OpenBLAS preloaded for mlx ({where})"
