//! Oracle tests: our statistics against scipy / scikit-learn fixtures.
