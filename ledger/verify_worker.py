"""A worker process of ``ledger.verify.verify_ledger``: verifies one range of job uuids in an exported snapshot.

Reads the pickled request (connection arguments, snapshot id, bounds) from stdin and writes the pickled
``_RangeResult`` to stdout. Started by the verifier itself (``python -m ledger.verify_worker``), never by hand.
"""

from __future__ import annotations

import asyncio
import pickle
import sys

from ledger.verify import range_pass


def main() -> None:
    """Run one range of the pass and hand its result back to the parent."""
    connect, snapshot, bounds = pickle.loads(sys.stdin.buffer.read())
    result = asyncio.run(range_pass(connect, snapshot, bounds))
    sys.stdout.buffer.write(pickle.dumps(result))


if __name__ == "__main__":
    main()
