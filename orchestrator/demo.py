"""The main job on the embedded default (`./dev demo`).

Until the protection demo lands, this walks the stream tools over a
Remus-checkpointed stream laid out as Xen 4.17 writes it: generate, verify,
dump, then cut the stream mid-checkpoint to show what a secondary would do.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from .streams import StreamDecoder, StreamError, StreamType
from .streams.dump import dump_lines
from .streams.fileio import verify_file
from .streams.synth import SynthSpec, generate, write_all


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="remus-demo-") as tmp:
        path = Path(tmp) / "demo-guest.remus"
        spec = SynthSpec(stream_type=StreamType.REMUS, pages=4096, checkpoints=20, dirty_pages=64)
        with path.open("wb") as f:
            size = write_all(f, generate(spec))
        print(f"== generated {path.name}: {size} bytes, a Remus stream of 1 + 20 checkpoints")
        with io.FileIO(path, "rb") as f:
            print(verify_file(f).render())
        print("\n== remusctl stream dump (first 16 lines)")
        with io.FileIO(path, "rb") as f:
            for i, line in enumerate(dump_lines(f)):
                if i == 16:
                    break
                print(line)
        data = path.read_bytes()
        cut = data[: size - 40]
        print(f"\n== the same stream cut 40 bytes short ({len(cut)} bytes), as if the primary died")
        try:
            verify_file(io.BytesIO(cut), StreamDecoder(None, StreamType.REMUS))
        except StreamError as exc:
            print(f"verify: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
