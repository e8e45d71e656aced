"""Tables: CSV files (written atomically) and markdown tables."""

import csv
import io
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from badnet.io import workdir


def write_csv(path: pathlib.Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]
              ) -> None:
  """A CSV file with a header row of ``fields`` and one line per row (a mapping by field)."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fields, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  workdir.write_text(path, buffer.getvalue())


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  """The rows of a CSV file written by ``write_csv`` ([] if there is no file)."""
  if not path.is_file():
    return []
  with path.open(newline='') as handle:
    return list(csv.DictReader(handle))


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
  """A markdown table's lines; ``align`` has one letter per column: 'l' (left) or 'r' (right)."""
  row = lambda cells: '| ' + ' | '.join(str(cell) for cell in cells) + ' |'
  rule = '|' + '|'.join({'l': '---', 'r': '---:'}[a] for a in align) + '|'
  return [row(header), rule, *map(row, rows)]


def fmt(value: float | None, digits: int = 2) -> str:
  """A figure in a table: ``digits`` decimals, '—' for none."""
  return '—' if value is None else f'{value:.{digits}f}'


def number_first(text: str) -> tuple[int, float, str]:
  """A sort key: numbers by value, then other text ('mask<=0.2', an X of ANP's) by itself."""
  try:
    return 0, float(text), ''
  except ValueError:
    return 1, 0.0, text


def split_top_level(text: str) -> list[str]:
  """``text`` split at the commas outside brackets: 'labels=(0,7),steps=5' is two items."""
  items, depth, start = [], 0, 0
  for index, char in enumerate(text):
    depth += (char in '([{') - (char in ')]}')
    if char == ',' and depth == 0:
      items.append(text[start:index])
      start = index + 1
  return items + [text[start:]]
