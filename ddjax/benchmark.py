"""`python -m ddjax.benchmark`, at the name scripts use; the code is ddjax.tools.benchmark."""
from ddjax.tools.benchmark import run

if __name__ == '__main__':
  run()
