"""CSV manifests as spreadsheets save them: the ingest's `path,label[,part]` and the oracle's ground truth read alike."""
from __future__ import annotations

import csv
import io
from pathlib import Path

DELIMITERS = ",\t;"


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a CSV file. Excel's "CSV UTF-8" starts with a byte-order mark and its "Unicode Text" is
    UTF-16 with tabs; some locales save with semicolons; column names are read stripped and lower-case ("Path,Label").
    ValueError naming the file when it is not UTF-8 or UTF-16 text (QA: a bare codec error)."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as CSV UTF-8") from None
    header = text.split("\n", 1)[0].rstrip("\r")
    # the delimiter the header line uses (it holds column names only; a path may hold commas): one that gives a 'path'
    # column, the most columns, a comma on a tie (QA: "path<TAB>label<TAB>part (cam,side,id)" split at its commas). A
    # single column ("path"): no delimiter, or a path holding a comma was cut there (QA)
    splits = [candidate for candidate in DELIMITERS if candidate in header]
    delimiter = max(splits, key=lambda candidate: ("path" in (name.strip().lower() for name in header.split(candidate)),
                                                   header.count(candidate), candidate == ",")) if splits else "\x1f"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    names = [name.strip().lower() for name in reader.fieldnames or []]
    reader.fieldnames = names
    return names, list(reader)
