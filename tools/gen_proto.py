"""Regenerate the committed gRPC/protobuf Python code from proto/; `--check` fails if it is stale.

Run from anywhere: python tools/gen_proto.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted(PROTO_ROOT.rglob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on {proto}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        stale = []
        for fresh in pathlib.Path(tmp).rglob("*"):
            if fresh.is_file() and fresh.name.endswith(SUFFIXES):
                committed = PROTO_ROOT / fresh.relative_to(tmp)
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    stale.append(str(committed.relative_to(ROOT)))
    if stale:
        print("generated code is stale; run: python tools/gen_proto.py", *stale, sep="\n  ")
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
