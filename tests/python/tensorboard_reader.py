"""Reads a run's monitor output back with the reference readers and prints it as JSON.

    tensorboard_reader.py TB_RUN_DIR CSV_DIR

- "scalars": what TensorBoard shows, from its own `EventAccumulator` (every value kept, orphaned
  steps purged as TensorBoard purges them): {tag: [[step, value], ...]}.
- "files": every event file of TB_RUN_DIR in name order, each event as written, through
  TensorBoard's own record reader (`RawEventFileLoader`, CRC-checked) and its `Event` message.
- "csv": every CSV file of CSV_DIR as Python's `csv` module reads it, with the value cells that
  are not what Python's `str(float(cell))` prints.
"""

import csv
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2


def event_json(event):
    what = event.WhichOneof("what")
    item = {"step": event.step, "wall_time": event.wall_time, "what": what}
    if what == "file_version":
        item["file_version"] = event.file_version
    elif what == "session_log":
        item["status"] = event.session_log.status
    elif what == "summary":
        item["values"] = [[v.tag, v.WhichOneof("value"), v.simple_value] for v in event.summary.value]
    return item


def main():
    run_dir, csv_dir = sys.argv[1], sys.argv[2]
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }
    files = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents."):
            records = RawEventFileLoader(os.path.join(run_dir, name)).Load()
            events = [event_json(event_pb2.Event.FromString(r)) for r in records]
            files.append({"name": name, "events": events})
    tables = {}
    for name in sorted(os.listdir(csv_dir)):
        with open(os.path.join(csv_dir, name), newline="") as f:
            rows = list(csv.reader(f))
        not_python = [cell for row in rows if row[0] != "step" for cell in row[1:] if str(float(cell)) != cell]
        tables[name] = {"rows": rows, "not_python_str": not_python}
    print(json.dumps({"scalars": scalars, "files": files, "csv": tables}))


if __name__ == "__main__":
    main()
