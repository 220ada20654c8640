from pathlib import Path

# The tests' own data (see its README). Nothing in the suite reads a path outside the repository.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
