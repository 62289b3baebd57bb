"""Instruction data: loading and validation (`records`), client allocation (`partition`,
`split`) and its figure (`plot`)."""
