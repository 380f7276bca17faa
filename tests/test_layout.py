"""The package layout: one wing per method over a shared core, and a wheel that ships it."""
import ast
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'coseg_jax')
# What each wing may import from coseg_jax: core is the bottom, cli the top; the two
# methods never import each other. torch_ref (the PyTorch twins) sits above the methods.
ALLOWED = {
    'core': {'core'},
    'backbones': {'core', 'backbones'},
    'multiclass': {'core', 'backbones', 'multiclass'},
    'instance': {'core', 'backbones', 'instance'},
    'cli': {'core', 'backbones', 'multiclass', 'instance', 'cli'},
}
# Top-level modules above the wings, and what they may import.
TOP_LEVEL = {
    'api.py': {'core', 'backbones', 'multiclass', 'instance'},  # the Python API, like cli
}
WINGS = sorted(ALLOWED)


def _imported_wings(path):
  """The coseg_jax subpackages (or top-level modules) that the file at `path` imports."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('coseg_jax'):
      parts = node.module.split('.')
      if len(parts) > 1:
        found.add(parts[1])
      else:
        found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(a.name.split('.')[1] for a in node.names
                   if a.name.startswith('coseg_jax.'))
  return found


@pytest.mark.parametrize('wing', WINGS)
def test_no_wing_imports_a_higher_one(wing):
  folder = os.path.join(PACKAGE, wing)
  files = [f for f in os.listdir(folder) if f.endswith('.py')]
  assert files
  for name in files:
    imported = _imported_wings(os.path.join(folder, name))
    assert imported <= ALLOWED[wing], f'{wing}/{name} imports {sorted(imported - ALLOWED[wing])}'


@pytest.mark.parametrize('name', sorted(TOP_LEVEL))
def test_top_level_modules_import_only_their_layers(name):
  imported = _imported_wings(os.path.join(PACKAGE, name))
  assert imported and imported <= TOP_LEVEL[name], sorted(imported - TOP_LEVEL[name])


def test_the_package_imports_no_module_eagerly():
  # `import coseg_jax` must stay light: the API comes through a lazy __getattr__.
  assert _imported_wings(os.path.join(PACKAGE, '__init__.py')) <= {'api'}
  source = open(os.path.join(PACKAGE, '__init__.py')).read()
  assert 'def __getattr__' in source


def test_the_layering_check_sees_imports():
  # The check above would pass vacuously if it saw no import at all.
  assert _imported_wings(os.path.join(PACKAGE, 'multiclass', 'pipeline.py')) >= {
      'core', 'backbones', 'multiclass'}


def test_every_module_is_in_a_wing():
  top = {f for f in os.listdir(PACKAGE) if f.endswith('.py')}
  assert top == {'__init__.py', 'torch_ref.py', *TOP_LEVEL}
  for wing in WINGS:
    assert os.path.isfile(os.path.join(PACKAGE, wing, '__init__.py')), wing


@pytest.mark.slow
def test_wheel_ships_every_subpackage(tmp_path):
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path), ROOT], check=True, capture_output=True,
                 cwd=str(tmp_path))
  (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith('.whl')]
  names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, f), ROOT).replace(os.sep, '/')
        assert rel in names, rel
