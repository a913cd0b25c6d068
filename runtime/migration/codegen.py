"""Regenerate migration_pb2.py and migration_pb2_grpc.py from migration.proto.

    python -m shoal.runtime.migration.codegen

The checked-in files were made this way with grpcio-tools 1.85.1 (pinned in
requirements.lock). protoc writes `import migration_pb2`; the import is rewritten to a
package-relative one so the module works as shoal.runtime.migration.migration_pb2.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
PROTO = "migration.proto"


def main() -> int:
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            PROTO,
        ]
    )
    if rc != 0:
        print(f"protoc failed ({rc})", file=sys.stderr)
        return rc
    grpc_file = HERE / "migration_pb2_grpc.py"
    text = grpc_file.read_text()
    text = text.replace("import migration_pb2 as", "from . import migration_pb2 as")
    grpc_file.write_text(text)
    print(f"wrote {HERE / 'migration_pb2.py'} and {grpc_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
