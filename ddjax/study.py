"""`python -m ddjax.study`, at the name scripts use; the code is ddjax.evaluation.study."""
from ddjax.evaluation.study import run

if __name__ == '__main__':
  run()
