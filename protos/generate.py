"""Generate the Python stubs of protos/ into service/convserve/pb/ (run by `make protos`).

    python protos/generate.py [OUT_DIR]

grpc_tools writes `from convserve.v1 import convserve_pb2`, an import that only works with the
output folder on sys.path; the generated files are rewritten to import through `convserve.pb`.
The stub-freshness test generates into a temporary folder and compares the bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "service" / "convserve" / "pb"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                        f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                        f"--grpc_python_out={out_dir}", *PROTOS])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    generated = sorted(p for p in out_dir.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in generated:
        text = path.read_text()
        fixed = text.replace("from convserve.v1 import", "from convserve.pb.convserve.v1 import")
        if fixed != text:
            path.write_text(fixed)
    for path in generated:  # every folder from out_dir down is a regular package
        for folder in [path.parent, *path.parent.parents]:
            (folder / "__init__.py").touch()
            if folder == out_dir:
                break
    return generated


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
