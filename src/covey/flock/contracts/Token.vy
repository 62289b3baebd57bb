# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title Covey stake token
@license Apache-2.0
@notice A plain, fixed-supply ERC-20 for FLock-mode stakes and rewards on test
        chains: the whole supply is minted to the deployer, who hands it out.
        No mint, no burn, no owner, no fee, no hooks: the task contract only
        needs `transfer`, `transferFrom` and `approve` to behave as EIP-20 says.
        Written here rather than imported from snekmate because snekmate is
        AGPL-3.0 and Covey is Apache-2.0. On a real network, attach the task to
        an existing ERC-20 instead of deploying this one.
"""

from ethereum.ercs import IERC20
from ethereum.ercs import IERC20Detailed

implements: IERC20
implements: IERC20Detailed

name: public(String[32])
symbol: public(String[8])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])


event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256


event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256


@deploy
def __init__(name_: String[32], symbol_: String[8], supply: uint256):
    self.name = name_
    self.symbol = symbol_
    self.decimals = 18
    self.totalSupply = supply
    self.balanceOf[msg.sender] = supply
    log Transfer(sender=empty(address), receiver=msg.sender, value=supply)


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "token: transfer to the zero address"
    balance: uint256 = self.balanceOf[sender]
    assert balance >= amount, "token: transfer amount exceeds balance"
    self.balanceOf[sender] = balance - amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    allowed: uint256 = self.allowance[sender][msg.sender]
    if allowed != max_value(uint256):
        assert allowed >= amount, "token: transfer amount exceeds allowance"
        self.allowance[sender][msg.sender] = allowed - amount
    self._transfer(sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    assert spender != empty(address), "token: approve to the zero address"
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True
