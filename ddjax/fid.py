"""`python -m ddjax.fid`: Inception statistics and FID from the command line, at the name scripts use; the code is
ddjax.evaluation.fid (its library names are re-exported here)."""
from ddjax.evaluation.fid import *  # noqa: F401,F403
from ddjax.evaluation.fid import main

if __name__ == '__main__':
  main()
