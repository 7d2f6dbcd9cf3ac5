"""The build report: every problem found in a corpus, with the file, the row and the fix.

Readers never drop a clip silently: each problem is recorded here (and the clip is skipped or repaired as the
entry says), and a `strict` build turns the first recorded problem into a failure.
"""

import dataclasses
import json
import os


class CorpusError(Exception):
  """A corpus problem that stops the build (strict mode, or nothing left to read)."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """One reported problem.

  Attributes:
    kind: short machine-readable tag, e.g. 'missing_wav', 'bad_age', 'converted'.
    file: path of the offending file (the CSV for row problems, the audio file for audio problems).
    row: 1-based line number in `file` (the header is line 1), or None when the problem is not a row's.
    message: what is wrong and what to do about it.
    action: what the build did: 'skipped', 'repaired', 'converted', 'noted' (a fact of
      the layout, not a fault) or 'failed'.
  """
  kind: str
  file: str
  row: int | None
  message: str
  action: str

  def __str__(self):
    where = f"{self.file} row {self.row}" if self.row is not None else self.file
    return f"{where}: {self.message} [{self.action}]"


# Conversions, and facts of a layout that are noted (an A-VB data_info.csv without Subject_ID), are reported for
# transparency but are not failures, even under `strict`.
_INFORMATIONAL = ("converted", "noted")


@dataclasses.dataclass
class BuildReport:
  """Collects problems while a corpus is read; optionally strict."""
  strict: bool = False
  problems: list[Problem] = dataclasses.field(default_factory=list)

  def add(self, kind, file, row, message, action):
    problem = Problem(kind, os.fspath(file), row, message, action)
    if self.strict and action not in _INFORMATIONAL:
      raise CorpusError(f"{problem} (strict mode: fix the input or run with strict=False to skip it)")
    self.problems.append(problem)
    return problem

  def of_kind(self, kind):
    return [p for p in self.problems if p.kind == kind]

  @property
  def num_converted(self):
    return len(self.of_kind("converted"))

  @property
  def num_skipped(self):
    return sum(p.action == "skipped" for p in self.problems)

  def extend(self, other):
    self.problems.extend(other.problems)

  def summary(self, max_lines=20):
    """Human-readable summary: counts per kind, then the first `max_lines` entries."""
    if not self.problems:
      return "build report: no problems"
    counts = {}
    for p in self.problems:
      counts[p.kind] = counts.get(p.kind, 0) + 1
    lines = ["build report: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    lines += [f"  {p}" for p in self.problems[:max_lines]]
    if len(self.problems) > max_lines:
      lines.append(f"  ... {len(self.problems) - max_lines} more in the report file")
    return "\n".join(lines)

  def to_json(self):
    return {
        "num_problems": len(self.problems),
        "num_converted": self.num_converted,
        "num_skipped": self.num_skipped,
        "problems": [dataclasses.asdict(p) for p in self.problems],
    }

  def write(self, path):
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1)
