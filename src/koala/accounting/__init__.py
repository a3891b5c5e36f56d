"""Accounting: what each model costs (`measure`) and what a run spent, round by round (`ledger`)."""
