"""docs/configuration.md documents every key of every shipped config (configs/*.py but the '_' helpers) by its full
dotted name, and its default column states the values of configs/digits.py and configs/digits_ddgan.py.

The doc's rows are the Markdown table lines whose first cell is a backticked key, `section.key`. The default cell is
one of: `X` (the value in digits.py, and in digits_ddgan.py when that has the key with the same value);
`X`; digits_ddgan.py: `Y` (the two differ); `Y` (a key only digits_ddgan.py has, of those two); or — (a key neither
has). X and Y are Python literals, compared with the config's value as JSON text (tuples as lists, placeholders
None), so `(1, 2)` matches (1, 2), `0.0001` matches 1e-4, and `0` does not match 0.0 or False.
"""
import ast
import functools
import json
import pathlib
import re

from ddjax.config import load_config_module
from ddjax.workdir import flat_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / 'docs' / 'configuration.md'
ROW = re.compile(r'^\|\s*`([A-Za-z_][\w.]*)`\s*\|([^|]*)\|')
DDGAN_NOTE = '; digits_ddgan.py: '


@functools.cache
def shipped_configs() -> dict[str, dict]:
  """{file name: flat config} of every shipped config."""
  return {path.name: flat_config(load_config_module(path).get_config())
          for path in sorted((REPO / 'configs').glob('*.py')) if not path.name.startswith('_')}


def documented() -> dict[str, str]:
  """{key: its default cell} of every table row of the doc."""
  rows = {}
  for line in DOC.read_text(encoding='utf-8').splitlines():
    match = ROW.match(line)
    if match:
      assert match[1] not in rows, f'{match[1]} has two rows in {DOC}'
      rows[match[1]] = match[2].strip()
  return rows


def as_text(value) -> str:
  """The normalised form both sides are compared in: JSON text."""
  return json.dumps(value, sort_keys=True)


def cell_text(cell: str) -> str:
  """`literal` -> as_text(literal); — (and any words after it) -> '—'."""
  cell = cell.strip()
  if cell.startswith('—'):
    return '—'
  if not (len(cell) >= 2 and cell[0] == cell[-1] == '`'):
    return f'unparsable {cell!r}'
  try:
    return as_text(ast.literal_eval(cell[1:-1]))
  except (ValueError, SyntaxError):
    return f'unparsable {cell!r}'


def test_every_key_of_every_shipped_config_is_documented():
  rows = documented()
  missing = {name: sorted(set(flat) - set(rows)) for name, flat in shipped_configs().items()}
  missing = {name: keys for name, keys in missing.items() if keys}
  assert not missing, f'keys without a row in {DOC.relative_to(REPO)}: ' + '; '.join(
      f'{name}: {", ".join(keys)}' for name, keys in missing.items())


def test_every_documented_key_is_in_a_shipped_config():
  known = set().union(*shipped_configs().values())
  stale = sorted(set(documented()) - known)
  assert not stale, f'rows of {DOC.relative_to(REPO)} for keys no shipped config has: {", ".join(stale)}'


def test_default_column_states_the_digits_configs_values():
  digits, ddgan = shipped_configs()['digits.py'], shipped_configs()['digits_ddgan.py']
  wrong = []
  for key, cell in documented().items():
    stated, _, stated_ddgan = cell.partition(DDGAN_NOTE)
    expected = as_text(digits[key]) if key in digits else as_text(ddgan[key]) if key in ddgan else '—'
    differs = key in digits and key in ddgan and as_text(ddgan[key]) != expected
    expected_ddgan = as_text(ddgan[key]) if differs else None
    got = (cell_text(stated), cell_text(stated_ddgan) if stated_ddgan else None)
    if got != (expected, expected_ddgan):
      wrong.append(f'{key}: the doc says {cell!r}, the configs give {expected}'
                   + (f'{DDGAN_NOTE}{expected_ddgan}' if expected_ddgan else ''))
  assert not wrong, f'defaults in {DOC.relative_to(REPO)} that differ from the configs (as JSON):\n' + '\n'.join(wrong)
