"""FLock mode: a Vyper task contract (stake, draw roles, propose, vote, reward, slash) and a
web3.py client for it, on an embedded EVM or any Ethereum JSON-RPC endpoint."""
