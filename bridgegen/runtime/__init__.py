"""Hand-written runtime that the generated bridges target."""
