# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title Covey FLock task: stake, draw roles, propose, vote, reward and slash
@license Apache-2.0
@notice One federated fine-tuning task run under FLock's rules (version 3: the rules never
        pay anyone to lie; see "Incentives" below and docs/flock.md's threat model).

    The task is created with a token, its Params and `task_bundle`: the
    sha2-256 digest of the CID of the task bundle (what to train, on which
    base model, how to judge), readable by anyone. `deployed_at` is the block
    it was created in: event scans start there. Every participant registers an
    `endpoint` (an http(s) URL, at most 256 bytes) where it serves its blobs;
    set at join, changed with set_endpoint. Endpoints are not checked here:
    peers check them before connecting (covey.store.endpoints).

    Membership: every participant stakes exactly `stake` (one member, one
    stake, one seat per draw, one vote). Extra capital buys nothing here; a
    party that wants more influence must run more members, each staking and
    doing the work (or being slashed for not doing it).

    Phase machine (`phase()`; a window of w blocks spans w blocks from the
    block that opened its stage; `phase_at(b)` tells what a transaction mined
    in block b would see, `phase_end()` where the current phase ends):

      REGISTRATION    join(endpoint): approve + transferFrom of `stake`, at
                      most max_participants; registration_blocks from deployment
      AWAIT_START     anyone calls start() (keeper fee): fewer than
                      min_participants -> CANCELLED
      per round r = 0 .. rounds-1:
        SEED_COMMIT     commit_seed(keccak256(abi_encode(seed, sender)));
                        join() is open again while a slot is free
        SEED_REVEAL     reveal_seed(seed), in every block of the window but
                        the last: the last block (the beacon block) takes no
                        reveals, so its hash comes after every reveal
        AWAIT_DRAW      anyone calls draw_roles() (keeper fee): members that
                        did not commit or did not reveal are slashed
                        no_show_pct and sit the round out; proposers and voters
                        are drawn uniformly from the revealers by a partial
                        Fisher-Yates shuffle keyed by keccak256(abi_encode(xor
                        of the revealed seeds, blockhash(beacon block), round,
                        this contract)). Too few revealers -> VOID.
        PROPOSE_COMMIT  each proposer trains, then commits
                        keccak256(abi_encode(digest, salt, sender)), digest
                        being the sha2-256 digest of its update's CID; the
                        update is published only after this window closes
        PROPOSE_REVEAL  reveal_proposal(digest, salt). A digest counts once in
                        the whole task: revealed again in a later round, or by
                        a proposer of the same round that committed later, it
                        is a duplicate (a missed duty)
        VOTE_COMMIT     each voter commits keccak256(abi_encode(accepts, salt,
                        sender)); bit i of `accepts` is its verdict on the
                        proposal of proposers_of(r)[i]; every ballot weighs 1.
                        Closed when no proposal is valid.
        VOTE_REVEAL     reveal_vote(accepts, salt)
        AWAIT_FINALIZE  anyone calls finalize() (keeper fee): settles the round
      ENDED           after the last round: withdraw() the stake
      CANCELLED       withdraw() the stake; the creator reclaims the pool
      STALLED         a due start/draw_roles/finalize was not called within
                      timeout_blocks (<= 255) of becoming due: the task stops
                      where it is, everyone withdraws its stake and the
                      creator reclaims the rewards of the rounds not played

    Settlement (finalize). Every round has the same reward, fixed at creation:
    round_budget = (reward_pool - keeper_fee * (1 + 2 * rounds)) // rounds
    (the keeper fees of every transition are set aside first). A proposal is
    valid when revealed and not a duplicate. With W the number of ballots
    committed, A the revealed ballots accepting it and R those rejecting it:
      accepted   A * 100 > threshold_pct * W
      rejected   R * 100 > (100 - threshold_pct) * W
      undecided  neither (an exact tie, or withheld ballots were pivotal):
                 nobody is paid or slashed for it
    Withheld ballots count on neither side, so withholding a ballot can leave a
    verdict undecided but never turn an acceptance into a rejection or back.
      ACCEPTED      some proposal accepted: each accepted proposal earns
                    (100 - voter_reward_pct)% of the reward / proposers_per_round
      REJECTED      none accepted, some rejected
      NO_QUORUM     no valid proposal was decided: nothing is paid
      NO_PROPOSALS  no valid proposal: voting was closed, nothing is paid
      in ACCEPTED and REJECTED, a voter that revealed earns voter_reward_pct%
      of the reward / voters_per_round, times the share of the decided
      verdicts it matched; it loses slash_pct% * wrong / n of its stake, wrong
      being the decided verdicts it voted against, n the valid proposals.
    Slashes:
      slash_pct     a rejected proposal, a losing vote (in part, as above)
      no_show_pct   a missed duty: no seed committed or revealed, no valid
                    proposal (none, not revealed, or a duplicate), no vote
                    revealed while a valid proposal was up, or leaving with
                    exit() before the task is over. no_show_pct > slash_pct,
                    so not acting costs more than any outcome of acting. Each
                    missed duty but exit counts a missed round; at
                    max_missed_rounds the participant is evicted: removed, its
                    slot freed, its remaining stake credited to `rewards`.
    Rewards, keeper fees and eviction refunds accrue to `rewards`, pulled
    with claim() at any time. A participant may exit() (paying no_show_pct)
    during SEED_COMMIT before committing, or during a round in which it has
    no role; an address that left cannot rejoin.

    Incentives: nothing a participant can do to others ever pays it. Each
    payment depends only on the payee's own verdicts and work, at fixed rates
    (a round's budget is never shared among fewer winners), and every token a
    round does not pay, and every slash, is burned: it stays locked in this
    contract (`burned`), paid to nobody, the creator included. So rejecting a
    good proposal, outvoting an honest voter, slashing or evicting someone
    earns the liar nothing: its own pay is the same whether it votes with the
    truth or against it, and a voter outvoted is the only one who loses. The
    creator gets back only what was never spent on a played round: the whole
    pool if the task was cancelled or never started, the budgets of rounds
    never played if it stalled, and the keeper fees nobody earned.

    Bounds: the stake and the reward pool are at most 2**96 wei, rounds at
    most 10,000 and participants 64, so every product in settlement stays
    below 2**200 and no reachable state makes a transition overflow. Every
    loop is bounded by MAX_PARTICIPANTS; transitions make no external calls.
    Keeper fees for every transition together are at most 5% of the pool.
    Measured gas at the cap: benchmarks/bench_gas.py.

    Trust assumptions:
    - Verdicts: a round's voters are trusted as a majority: a coalition that
      holds more than threshold_pct% of a round's ballots decides that round's
      verdicts (it cannot pay itself more than the fixed rates by doing so,
      but it can pay a colluding proposer for garbage). With f of n members in
      a coalition, the chance that a uniform draw gives it such a majority is
      tabulated in docs/flock.md; tasks size voters_per_round against it.
    - Role draws: no revealer can predict the draw when it decides whether to
      reveal, because the draw mixes in the hash of the beacon block, which
      takes no reveals and is mined after every reveal; withholding a seed
      costs a no-show slash and the round. Whoever produces the beacon block
      could grind its hash if it also knows the seeds: on a chain whose
      blocks are made by the task's participants (a devnet that mines a block
      per transaction) that is anyone; use a chain whose block producers are
      not participants, or one that mines on a clock.
    - Proposals: a digest is hidden behind its commitment, bound to its
      sender, until the commit window closes; a copier could only commit a
      digest it was given, and then the first committer keeps it; a digest
      seen in an earlier round is refused. Near-copies under another digest
      are for the voters to refuse (covey.flock.scoring).
    - The token is trusted to follow EIP-20 (use Covey's Token or a known
      one); every token call comes after the state change it pays for and
      functions that move tokens are @nonreentrant.
    - Digests are not checked on chain: voters fetch each update by its CID
      and judge it off chain.
"""

from ethereum.ercs import IERC20

MAX_PARTICIPANTS: constant(uint256) = 64
MAX_STAKE: constant(uint256) = 2**96
MAX_POOL: constant(uint256) = 2**96
MAX_ROUNDS: constant(uint256) = 10000
MAX_TIMEOUT: constant(uint256) = 255  # draw_roles reads a block hash, kept for 256 blocks
MAX_ENDPOINT: constant(uint256) = 256
MAX_KEEPER_PCT: constant(uint256) = 5  # every transition's keeper fee together, of the pool

PHASE_REGISTRATION: constant(uint256) = 0
PHASE_AWAIT_START: constant(uint256) = 1
PHASE_SEED_COMMIT: constant(uint256) = 2
PHASE_SEED_REVEAL: constant(uint256) = 3
PHASE_AWAIT_DRAW: constant(uint256) = 4
PHASE_PROPOSE_COMMIT: constant(uint256) = 5
PHASE_PROPOSE_REVEAL: constant(uint256) = 6
PHASE_VOTE_COMMIT: constant(uint256) = 7
PHASE_VOTE_REVEAL: constant(uint256) = 8
PHASE_AWAIT_FINALIZE: constant(uint256) = 9
PHASE_ENDED: constant(uint256) = 10
PHASE_CANCELLED: constant(uint256) = 11
PHASE_STALLED: constant(uint256) = 12

STAGE_REGISTRATION: constant(uint256) = 0
STAGE_SEEDING: constant(uint256) = 1
STAGE_ROUND: constant(uint256) = 2
STAGE_ENDED: constant(uint256) = 3
STAGE_CANCELLED: constant(uint256) = 4

ROLE_NONE: constant(uint256) = 0
ROLE_PROPOSER: constant(uint256) = 1
ROLE_VOTER: constant(uint256) = 2

OUTCOME_PENDING: constant(uint256) = 0
OUTCOME_ACCEPTED: constant(uint256) = 1
OUTCOME_REJECTED: constant(uint256) = 2
OUTCOME_NO_PROPOSALS: constant(uint256) = 3
OUTCOME_NO_QUORUM: constant(uint256) = 4
OUTCOME_VOID: constant(uint256) = 5

SLASH_SEED_NOT_COMMITTED: constant(uint256) = 1
SLASH_SEED_NOT_REVEALED: constant(uint256) = 2
SLASH_NO_PROPOSAL: constant(uint256) = 3
SLASH_DUPLICATE_PROPOSAL: constant(uint256) = 4
SLASH_PROPOSAL_REJECTED: constant(uint256) = 5
SLASH_VOTE_NOT_REVEALED: constant(uint256) = 6
SLASH_LOSING_VOTE: constant(uint256) = 7
SLASH_EXIT: constant(uint256) = 8


struct Params:
    rounds: uint256
    min_participants: uint256
    max_participants: uint256
    stake: uint256
    reward_pool: uint256
    proposers_per_round: uint256
    voters_per_round: uint256
    slash_pct: uint256
    no_show_pct: uint256
    threshold_pct: uint256
    voter_reward_pct: uint256
    keeper_fee: uint256
    max_missed_rounds: uint256
    registration_blocks: uint256
    seed_commit_blocks: uint256
    seed_reveal_blocks: uint256
    propose_commit_blocks: uint256
    propose_reveal_blocks: uint256
    vote_commit_blocks: uint256
    vote_reveal_blocks: uint256
    timeout_blocks: uint256


struct Vote:
    commitment: bytes32
    weight: uint256  # 1: every ballot weighs the same (one member, one stake, one vote)
    revealed: bool
    accepts: uint256  # bit i: accept the proposal of round_proposers[r][i]


struct Tally:
    committed_weight: uint256  # W: the ballots every proposal is judged against
    revealed_weight: uint256
    committed_count: uint256
    revealed_count: uint256


struct RoundResult:
    outcome: uint256
    reward: uint256  # round_budget; what the round did not pay was burned
    paid: uint256
    slashed: uint256  # burned too
    accepted: uint256  # bit i: the proposal of round_proposers[r][i] was accepted
    rejected: uint256  # bit i: ... was rejected (neither bit: undecided or not valid)


event TaskCreated:
    creator: indexed(address)
    token: address
    task_bundle: bytes32
    reward_pool: uint256

event Joined:
    participant: indexed(address)
    amount: uint256  # always params.stake
    endpoint: String[MAX_ENDPOINT]

event EndpointSet:
    participant: indexed(address)
    endpoint: String[MAX_ENDPOINT]

event TaskStarted:
    participants: uint256

event TaskCancelled:
    participants: uint256

event KeeperPaid:
    round: indexed(uint256)
    keeper: indexed(address)
    amount: uint256

event RoundStarted:
    round: indexed(uint256)
    start_block: uint256

event SeedCommitted:
    round: indexed(uint256)
    participant: indexed(address)
    commitment: bytes32

event SeedRevealed:
    round: indexed(uint256)
    participant: indexed(address)
    seed: bytes32

event RolesDrawn:
    round: indexed(uint256)
    seed: bytes32
    proposers: DynArray[address, MAX_PARTICIPANTS]
    voters: DynArray[address, MAX_PARTICIPANTS]

event ProposalCommitted:
    round: indexed(uint256)
    proposer: indexed(address)
    commitment: bytes32

event ProposalRevealed:
    round: indexed(uint256)
    proposer: indexed(address)
    digest: bytes32

event DuplicateProposal:
    round: indexed(uint256)
    proposer: indexed(address)
    original: address  # revealed the same digest in an earlier round, or committed it first

event VoteCommitted:
    round: indexed(uint256)
    voter: indexed(address)
    commitment: bytes32
    weight: uint256

event VoteRevealed:
    round: indexed(uint256)
    voter: indexed(address)
    accepts: uint256
    weight: uint256

event ProposalJudged:
    round: indexed(uint256)
    proposer: indexed(address)
    accept_votes: uint256
    reject_votes: uint256
    accepted: bool
    rejected: bool

event Slashed:
    round: indexed(uint256)
    participant: indexed(address)
    amount: uint256
    reason: uint256

event Rewarded:
    round: indexed(uint256)
    participant: indexed(address)
    amount: uint256

event Evicted:
    round: indexed(uint256)
    participant: indexed(address)
    refund: uint256  # the remaining stake, credited to rewards

event RoundFinalized:
    round: indexed(uint256)
    outcome: uint256
    reward: uint256  # round_budget
    paid: uint256  # rewards credited this round; reward - paid is burned
    slashed: uint256  # every slash of the round, the draw's included (burned)
    accepted: uint256
    rejected: uint256
    committed_weight: uint256

event TaskEnded:
    pool: uint256

event Claimed:
    participant: indexed(address)
    amount: uint256

event Withdrawn:
    participant: indexed(address)
    stake: uint256

event Exited:
    participant: indexed(address)
    round: uint256
    amount: uint256  # the stake paid back, after the exit's no_show_pct slash

event PoolReclaimed:
    creator: indexed(address)
    amount: uint256


token: public(immutable(IERC20))
creator: public(immutable(address))
params: public(immutable(Params))
task_bundle: public(immutable(bytes32))
deployed_at: public(immutable(uint256))
registration_end: public(immutable(uint256))
round_budget: public(immutable(uint256))  # every round's reward, fixed at creation

stage: uint256
stage_start: public(uint256)
current_round: public(uint256)
pool: public(uint256)  # the budgets of rounds not settled yet, and keeper fees not paid yet
burned: public(uint256)  # slashes and unpaid rewards: locked here for good, nobody's
total_staked: public(uint256)
total_unclaimed: public(uint256)

participants: DynArray[address, MAX_PARTICIPANTS]
participant_index: HashMap[address, uint256]  # position + 1; 0 = not a participant
joined: public(HashMap[address, bool])  # ever joined; addresses that left stay True
stakes: public(HashMap[address, uint256])
rewards: public(HashMap[address, uint256])
endpoints: public(HashMap[address, String[MAX_ENDPOINT]])
missed_rounds: public(HashMap[address, uint256])

seed_commitments: HashMap[uint256, HashMap[address, bytes32]]
seed_revealed: HashMap[uint256, HashMap[address, bool]]
seed_xor: HashMap[uint256, uint256]
round_seed: public(HashMap[uint256, bytes32])

roles: HashMap[uint256, HashMap[address, uint256]]
round_proposers: HashMap[uint256, DynArray[address, MAX_PARTICIPANTS]]
round_voters: HashMap[uint256, DynArray[address, MAX_PARTICIPANTS]]
proposal_commitments: HashMap[uint256, HashMap[address, bytes32]]
proposal_order: HashMap[uint256, HashMap[address, uint256]]  # 1 = committed first
proposal_commits: HashMap[uint256, uint256]
digests: HashMap[uint256, HashMap[address, bytes32]]
digest_owner: HashMap[bytes32, address]  # task-wide: a digest counts once in the whole task
digest_round: HashMap[bytes32, uint256]  # the round its owner revealed it in
proposal_count: public(HashMap[uint256, uint256])  # valid proposals
votes: HashMap[uint256, HashMap[address, Vote]]
tallies: HashMap[uint256, Tally]
results: HashMap[uint256, RoundResult]


@deploy
def __init__(token_: IERC20, p: Params, task_bundle_: bytes32):
    assert p.rounds >= 1 and p.rounds <= MAX_ROUNDS, "init: rounds not in 1..10000"
    assert p.max_participants <= MAX_PARTICIPANTS, "init: max_participants above the hard cap"
    assert p.min_participants <= p.max_participants, "init: min_participants above max"
    assert p.proposers_per_round >= 1, "init: need at least one proposer per round"
    assert p.voters_per_round >= 1, "init: need at least one voter per round"
    assert p.proposers_per_round + p.voters_per_round <= p.min_participants, (
        "init: proposers + voters exceed min_participants"
    )
    assert p.stake >= 1 and p.stake <= MAX_STAKE, "init: stake not in 1..MAX_STAKE"
    assert p.reward_pool <= MAX_POOL, "init: reward_pool above MAX_POOL"
    assert p.no_show_pct > p.slash_pct and p.no_show_pct <= 100, (
        "init: need slash_pct < no_show_pct <= 100"
    )
    assert p.threshold_pct >= 1 and p.threshold_pct <= 99, "init: threshold_pct not in 1..99"
    assert p.voter_reward_pct <= 100, "init: voter_reward_pct above 100"
    assert p.keeper_fee * (1 + 2 * p.rounds) * 100 <= p.reward_pool * MAX_KEEPER_PCT, (
        "init: keeper fees for every transition exceed 5% of the reward pool"
    )
    assert p.max_missed_rounds >= 1, "init: max_missed_rounds must be at least 1"
    assert p.registration_blocks >= 1 and p.seed_commit_blocks >= 1, "init: windows must be >= 1"
    assert p.seed_reveal_blocks >= 2, "init: seed_reveal_blocks must be >= 2 (the last is the beacon)"
    assert p.propose_commit_blocks >= 1, "init: windows must be >= 1"
    assert p.propose_reveal_blocks >= 1 and p.vote_commit_blocks >= 1, "init: windows must be >= 1"
    assert p.vote_reveal_blocks >= 1, "init: windows must be >= 1"
    assert p.timeout_blocks >= 1 and p.timeout_blocks <= MAX_TIMEOUT, (
        "init: timeout_blocks not in 1..255"
    )
    assert task_bundle_ != empty(bytes32), "init: empty task bundle"
    token = token_
    creator = msg.sender
    params = p
    task_bundle = task_bundle_
    deployed_at = block.number
    registration_end = block.number + p.registration_blocks
    round_budget = (p.reward_pool - p.keeper_fee * (1 + 2 * p.rounds)) // p.rounds
    self.pool = p.reward_pool
    log TaskCreated(
        creator=msg.sender, token=token_.address, task_bundle=task_bundle_, reward_pool=p.reward_pool
    )
    if p.reward_pool > 0:
        assert extcall token_.transferFrom(msg.sender, self, p.reward_pool, default_return_value=True), (
            "init: reward pool transfer failed"
        )


# ---------------------------------------------------------------- views


@internal
@view
def _phase_at(b: uint256) -> (uint256, uint256):
    """The phase a transaction mined in block b sees, and the first block after it (0: none)."""
    stage: uint256 = self.stage
    timeout: uint256 = params.timeout_blocks
    if stage == STAGE_REGISTRATION:
        if b < registration_end:
            return PHASE_REGISTRATION, registration_end
        if b < registration_end + timeout:
            return PHASE_AWAIT_START, registration_end + timeout
        return PHASE_STALLED, 0
    if stage == STAGE_ENDED:
        return PHASE_ENDED, 0
    if stage == STAGE_CANCELLED:
        return PHASE_CANCELLED, 0
    end: uint256 = self.stage_start
    if stage == STAGE_SEEDING:
        end += params.seed_commit_blocks
        if b < end:
            return PHASE_SEED_COMMIT, end
        end += params.seed_reveal_blocks
        if b < end:
            return PHASE_SEED_REVEAL, end
        if b < end + timeout:
            return PHASE_AWAIT_DRAW, end + timeout
        return PHASE_STALLED, 0
    end += params.propose_commit_blocks
    if b < end:
        return PHASE_PROPOSE_COMMIT, end
    end += params.propose_reveal_blocks
    if b < end:
        return PHASE_PROPOSE_REVEAL, end
    end += params.vote_commit_blocks
    if b < end:
        return PHASE_VOTE_COMMIT, end
    end += params.vote_reveal_blocks
    if b < end:
        return PHASE_VOTE_REVEAL, end
    if b < end + timeout:
        return PHASE_AWAIT_FINALIZE, end + timeout
    return PHASE_STALLED, 0


@internal
@view
def _phase() -> uint256:
    ph: uint256 = 0
    end: uint256 = 0
    ph, end = self._phase_at(block.number)
    return ph


@external
@view
def phase() -> uint256:
    """@notice The current phase (see the PHASE_* constants) at this block."""
    return self._phase()


@external
@view
def phase_at(b: uint256) -> (uint256, uint256):
    """
    @notice The phase a transaction mined in block b would see if no transition happens
            before, and the first block after that phase (0 when it has no end).
    """
    return self._phase_at(b)


@external
@view
def beacon_block() -> uint256:
    """
    @notice The block whose hash the current round's draw mixes in: the last block of its
            SEED_REVEAL window, which takes no reveals (0 before the task starts).
    """
    if self.stage != STAGE_SEEDING:
        return 0
    return self.stage_start + params.seed_commit_blocks + params.seed_reveal_blocks - 1


@external
@view
def get_participants() -> DynArray[address, MAX_PARTICIPANTS]:
    return self.participants


@external
@view
def participant_count() -> uint256:
    return len(self.participants)


@external
@view
def seed_status(r: uint256, who: address) -> (bytes32, bool):
    """@notice A participant's seed commitment in round r and whether it was revealed."""
    return self.seed_commitments[r][who], self.seed_revealed[r][who]


@external
@view
def role_of(r: uint256, who: address) -> uint256:
    """@notice 0 none, 1 proposer, 2 voter."""
    return self.roles[r][who]


@external
@view
def proposers_of(r: uint256) -> DynArray[address, MAX_PARTICIPANTS]:
    return self.round_proposers[r]


@external
@view
def voters_of(r: uint256) -> DynArray[address, MAX_PARTICIPANTS]:
    return self.round_voters[r]


@external
@view
def proposal_of(r: uint256, who: address) -> (bytes32, bytes32, bool):
    """@notice A proposer's commitment and revealed digest in round r, and whether it is valid."""
    digest: bytes32 = self.digests[r][who]
    return self.proposal_commitments[r][who], digest, self._valid(r, who, digest)


@external
@view
def proposals(r: uint256) -> (DynArray[address, MAX_PARTICIPANTS], DynArray[bytes32, MAX_PARTICIPANTS]):
    """@notice The valid proposals of round r (proposer, digest), in draw order."""
    who: DynArray[address, MAX_PARTICIPANTS] = []
    what: DynArray[bytes32, MAX_PARTICIPANTS] = []
    for p: address in self.round_proposers[r]:
        d: bytes32 = self.digests[r][p]
        if self._valid(r, p, d):
            who.append(p)
            what.append(d)
    return who, what


@external
@view
def vote_of(r: uint256, who: address) -> Vote:
    return self.votes[r][who]


@external
@view
def tally(r: uint256) -> Tally:
    return self.tallies[r]


@external
@view
def result(r: uint256) -> RoundResult:
    return self.results[r]


# ---------------------------------------------------------------- internals


@internal
@view
def _valid(r: uint256, who: address, digest: bytes32) -> bool:
    return (
        digest != empty(bytes32)
        and self.digest_owner[digest] == who
        and self.digest_round[digest] == r
    )


@internal
def _slash(r: uint256, who: address, pct: uint256, parts: uint256, whole: uint256, reason: uint256) -> uint256:
    """Burn parts/whole of pct% of the stake: it pays nobody, so slashing pays nobody."""
    amount: uint256 = self.stakes[who] * pct * parts // (100 * whole)
    self.stakes[who] -= amount
    self.total_staked -= amount
    self.burned += amount
    log Slashed(round=r, participant=who, amount=amount, reason=reason)
    return amount


@internal
def _no_show(r: uint256, who: address, reason: uint256) -> (uint256, bool):
    """Slash a missed duty and count the missed round; True when it is time to evict."""
    amount: uint256 = self._slash(r, who, params.no_show_pct, 1, 1, reason)
    missed: uint256 = self.missed_rounds[who] + 1
    self.missed_rounds[who] = missed
    return amount, missed >= params.max_missed_rounds


@internal
def _remove(who: address):
    index: uint256 = self.participant_index[who]
    last: address = self.participants.pop()
    if last != who:
        self.participants[index - 1] = last
        self.participant_index[last] = index
    self.participant_index[who] = 0


@internal
def _credit(who: address, amount: uint256):
    self.rewards[who] += amount
    self.total_unclaimed += amount


@internal
def _evict(r: uint256, who: address):
    self._remove(who)
    refund: uint256 = self.stakes[who]
    self.stakes[who] = 0
    self.total_staked -= refund
    self._credit(who, refund)
    log Evicted(round=r, participant=who, refund=refund)


@internal
def _reward(r: uint256, who: address, amount: uint256):
    self._credit(who, amount)
    log Rewarded(round=r, participant=who, amount=amount)


@internal
def _pay_keeper(r: uint256):
    fee: uint256 = min(params.keeper_fee, self.pool)
    if fee > 0:
        self.pool -= fee
        self._credit(msg.sender, fee)
        log KeeperPaid(round=r, keeper=msg.sender, amount=fee)


@internal
@pure
def _popcount(x: uint256) -> uint256:
    """Set bits of x (x < 2**MAX_PARTICIPANTS: one bit per proposer)."""
    count: uint256 = 0
    y: uint256 = x
    for i: uint256 in range(MAX_PARTICIPANTS):
        if y == 0:
            break
        count += y & 1
        y = y >> 1
    return count


@internal
def _next_round():
    r: uint256 = self.current_round + 1
    self.current_round = r
    if r == params.rounds:
        self.stage = STAGE_ENDED
        log TaskEnded(pool=self.pool)
    else:
        self.stage = STAGE_SEEDING
        self.stage_start = block.number
        log RoundStarted(round=r, start_block=block.number)


# ---------------------------------------------------------------- registration


@external
@nonreentrant
def join(endpoint: String[MAX_ENDPOINT]):
    """
    @notice Stake params.stake (approve it first) and register, with the URL where this
            participant serves its blobs. Open in REGISTRATION, and in SEED_COMMIT while
            a slot is free.
    """
    ph: uint256 = self._phase()
    assert ph == PHASE_REGISTRATION or ph == PHASE_SEED_COMMIT, (
        "join: only in REGISTRATION or SEED_COMMIT"
    )
    assert not self.joined[msg.sender], "join: already joined"
    assert len(self.participants) < params.max_participants, "join: task is full"
    amount: uint256 = params.stake
    self.joined[msg.sender] = True
    self.participants.append(msg.sender)
    self.participant_index[msg.sender] = len(self.participants)
    self.stakes[msg.sender] = amount
    self.total_staked += amount
    self.endpoints[msg.sender] = endpoint
    log Joined(participant=msg.sender, amount=amount, endpoint=endpoint)
    assert extcall token.transferFrom(msg.sender, self, amount, default_return_value=True), (
        "join: token transfer failed"
    )


@external
def set_endpoint(endpoint: String[MAX_ENDPOINT]):
    """@notice Change the URL where this participant serves its blobs."""
    assert self.participant_index[msg.sender] != 0, "set_endpoint: not a participant"
    self.endpoints[msg.sender] = endpoint
    log EndpointSet(participant=msg.sender, endpoint=endpoint)


@external
def start():
    """@notice Close registration: start round 0, or cancel if too few joined."""
    assert self._phase() == PHASE_AWAIT_START, "start: only in AWAIT_START"
    self._pay_keeper(0)
    n: uint256 = len(self.participants)
    if n < params.min_participants:
        self.stage = STAGE_CANCELLED
        log TaskCancelled(participants=n)
        return
    self.stage = STAGE_SEEDING
    self.stage_start = block.number
    log TaskStarted(participants=n)
    log RoundStarted(round=0, start_block=block.number)


# ---------------------------------------------------------------- randomness


@external
def commit_seed(commitment: bytes32):
    """@notice Commit keccak256(abi_encode(seed, sender)) for this round's draw."""
    assert self._phase() == PHASE_SEED_COMMIT, "commit_seed: only in SEED_COMMIT"
    assert self.participant_index[msg.sender] != 0, "commit_seed: not a participant"
    assert self.stakes[msg.sender] > 0, "commit_seed: no stake left"
    assert commitment != empty(bytes32), "commit_seed: empty commitment"
    r: uint256 = self.current_round
    assert self.seed_commitments[r][msg.sender] == empty(bytes32), "commit_seed: already committed"
    self.seed_commitments[r][msg.sender] = commitment
    log SeedCommitted(round=r, participant=msg.sender, commitment=commitment)


@external
def reveal_seed(seed: bytes32):
    """
    @notice Reveal the committed seed; it is XORed into the round's entropy. The reveal
            window's last block (the beacon block) takes no reveals.
    """
    assert self._phase() == PHASE_SEED_REVEAL, "reveal_seed: only in SEED_REVEAL"
    beacon: uint256 = self.stage_start + params.seed_commit_blocks + params.seed_reveal_blocks - 1
    assert block.number < beacon, "reveal_seed: the reveal window's last block takes no reveals"
    r: uint256 = self.current_round
    commitment: bytes32 = self.seed_commitments[r][msg.sender]
    assert commitment != empty(bytes32), "reveal_seed: no seed committed"
    assert not self.seed_revealed[r][msg.sender], "reveal_seed: already revealed"
    assert keccak256(abi_encode(seed, msg.sender)) == commitment, (
        "reveal_seed: seed does not match commitment"
    )
    self.seed_revealed[r][msg.sender] = True
    self.seed_xor[r] = self.seed_xor[r] ^ convert(seed, uint256)
    log SeedRevealed(round=r, participant=msg.sender, seed=seed)


@external
def draw_roles():
    """@notice Slash members that missed the seeds, then draw this round's proposers and voters."""
    assert self._phase() == PHASE_AWAIT_DRAW, "draw_roles: only in AWAIT_DRAW"
    r: uint256 = self.current_round
    self._pay_keeper(r)
    eligible: DynArray[address, MAX_PARTICIPANTS] = []
    leaving: DynArray[address, MAX_PARTICIPANTS] = []
    slashed: uint256 = 0
    for p: address in self.participants:
        if self.seed_revealed[r][p]:
            eligible.append(p)
            continue
        reason: uint256 = SLASH_SEED_NOT_COMMITTED
        if self.seed_commitments[r][p] != empty(bytes32):
            reason = SLASH_SEED_NOT_REVEALED
        amount: uint256 = 0
        evict: bool = False
        amount, evict = self._no_show(r, p, reason)
        slashed += amount
        if evict:
            leaving.append(p)
    for p: address in leaving:
        self._evict(r, p)
    # finalize adds its own slashes to these
    self.results[r].slashed = slashed
    n: uint256 = len(eligible)
    n_prop: uint256 = params.proposers_per_round
    need: uint256 = n_prop + params.voters_per_round
    if n < need:
        # nobody is paid for a void round: its budget is burned, as a round's unpaid reward is
        self.pool -= round_budget
        self.burned += round_budget
        self.results[r] = RoundResult(
            outcome=OUTCOME_VOID, reward=round_budget, paid=0, slashed=slashed, accepted=0, rejected=0
        )
        log RoundFinalized(
            round=r,
            outcome=OUTCOME_VOID,
            reward=round_budget,
            paid=0,
            slashed=slashed,
            accepted=0,
            rejected=0,
            committed_weight=0,
        )
        self._next_round()
        return
    # the hash of the beacon block (the reveal window's last, which takes no reveals): mined
    # after every reveal, so no revealer knows it when deciding whether to reveal, and no
    # reveal transaction is in it (timeout_blocks <= 255 keeps it readable)
    beacon: uint256 = self.stage_start + params.seed_commit_blocks + params.seed_reveal_blocks - 1
    seed: bytes32 = keccak256(abi_encode(self.seed_xor[r], blockhash(beacon), r, self))
    self.round_seed[r] = seed
    proposers: DynArray[address, MAX_PARTICIPANTS] = []
    voters: DynArray[address, MAX_PARTICIPANTS] = []
    for i: uint256 in range(need, bound=MAX_PARTICIPANTS):
        # partial Fisher-Yates: position i takes a uniform pick from positions i..n-1
        j: uint256 = i + convert(keccak256(abi_encode(seed, i)), uint256) % (n - i)
        picked: address = eligible[j]
        eligible[j] = eligible[i]
        eligible[i] = picked
        if i < n_prop:
            proposers.append(picked)
            self.roles[r][picked] = ROLE_PROPOSER
        else:
            voters.append(picked)
            self.roles[r][picked] = ROLE_VOTER
    self.round_proposers[r] = proposers
    self.round_voters[r] = voters
    self.stage = STAGE_ROUND
    self.stage_start = block.number
    log RolesDrawn(round=r, seed=seed, proposers=proposers, voters=voters)


# ---------------------------------------------------------------- propose and vote


@external
def commit_proposal(commitment: bytes32):
    """@notice Commit keccak256(abi_encode(digest, salt, sender)) of this round's update (once)."""
    assert self._phase() == PHASE_PROPOSE_COMMIT, "commit_proposal: only in PROPOSE_COMMIT"
    r: uint256 = self.current_round
    assert self.roles[r][msg.sender] == ROLE_PROPOSER, "commit_proposal: not a proposer this round"
    assert commitment != empty(bytes32), "commit_proposal: empty commitment"
    assert self.proposal_commitments[r][msg.sender] == empty(bytes32), (
        "commit_proposal: already committed"
    )
    order: uint256 = self.proposal_commits[r] + 1
    self.proposal_commits[r] = order
    self.proposal_commitments[r][msg.sender] = commitment
    self.proposal_order[r][msg.sender] = order
    log ProposalCommitted(round=r, proposer=msg.sender, commitment=commitment)


@external
def reveal_proposal(digest: bytes32, salt: bytes32):
    """
    @notice Open the committed proposal: the sha2-256 digest of the update's CID. A digest
            revealed in an earlier round, or in this round by a proposer that committed
            earlier, is a duplicate.
    """
    assert self._phase() == PHASE_PROPOSE_REVEAL, "reveal_proposal: only in PROPOSE_REVEAL"
    r: uint256 = self.current_round
    commitment: bytes32 = self.proposal_commitments[r][msg.sender]
    assert commitment != empty(bytes32), "reveal_proposal: no proposal committed"
    assert self.digests[r][msg.sender] == empty(bytes32), "reveal_proposal: already revealed"
    assert digest != empty(bytes32), "reveal_proposal: empty digest"
    assert keccak256(abi_encode(digest, salt, msg.sender)) == commitment, (
        "reveal_proposal: digest does not match commitment"
    )
    self.digests[r][msg.sender] = digest
    log ProposalRevealed(round=r, proposer=msg.sender, digest=digest)
    owner: address = self.digest_owner[digest]
    if owner == empty(address):
        self.digest_owner[digest] = msg.sender
        self.digest_round[digest] = r
        self.proposal_count[r] += 1
    elif (
        self.digest_round[digest] == r
        and self.proposal_order[r][msg.sender] < self.proposal_order[r][owner]
    ):
        self.digest_owner[digest] = msg.sender
        log DuplicateProposal(round=r, proposer=owner, original=msg.sender)
    else:
        log DuplicateProposal(round=r, proposer=msg.sender, original=owner)


@external
def commit_vote(commitment: bytes32):
    """@notice Commit keccak256(abi_encode(accepts, salt, sender)) (once); every ballot weighs 1."""
    assert self._phase() == PHASE_VOTE_COMMIT, "commit_vote: only in VOTE_COMMIT"
    r: uint256 = self.current_round
    assert self.roles[r][msg.sender] == ROLE_VOTER, "commit_vote: not a voter this round"
    assert self.proposal_count[r] > 0, "commit_vote: no valid proposals this round"
    assert commitment != empty(bytes32), "commit_vote: empty commitment"
    assert self.votes[r][msg.sender].commitment == empty(bytes32), "commit_vote: already voted"
    weight: uint256 = 1
    self.votes[r][msg.sender] = Vote(commitment=commitment, weight=weight, revealed=False, accepts=0)
    self.tallies[r].committed_weight += weight
    self.tallies[r].committed_count += 1
    log VoteCommitted(round=r, voter=msg.sender, commitment=commitment, weight=weight)


@external
def reveal_vote(accepts: uint256, salt: bytes32):
    """
    @notice Open the committed ballot.
    @param accepts bit i set: accept the proposal of proposers_of(round)[i]; bits of
           proposals that are not valid are ignored; bits at or above
           len(proposers_of(round)) are refused
    """
    assert self._phase() == PHASE_VOTE_REVEAL, "reveal_vote: only in VOTE_REVEAL"
    r: uint256 = self.current_round
    vote: Vote = self.votes[r][msg.sender]
    assert vote.commitment != empty(bytes32), "reveal_vote: no vote committed"
    assert not vote.revealed, "reveal_vote: already revealed"
    assert keccak256(abi_encode(accepts, salt, msg.sender)) == vote.commitment, (
        "reveal_vote: vote does not match commitment"
    )
    assert accepts >> len(self.round_proposers[r]) == 0, (
        "reveal_vote: accepts has bits beyond the round's proposers"
    )
    self.votes[r][msg.sender].revealed = True
    self.votes[r][msg.sender].accepts = accepts
    self.tallies[r].revealed_weight += vote.weight
    self.tallies[r].revealed_count += 1
    log VoteRevealed(round=r, voter=msg.sender, accepts=accepts, weight=vote.weight)


@external
def finalize():
    """@notice Settle the round (anyone, after VOTE_REVEAL): judge, pay, slash, open the next."""
    assert self._phase() == PHASE_AWAIT_FINALIZE, "finalize: only in AWAIT_FINALIZE"
    r: uint256 = self.current_round
    self._pay_keeper(r)
    reward: uint256 = round_budget
    tally: Tally = self.tallies[r]
    committed: uint256 = tally.committed_weight
    proposers: DynArray[address, MAX_PARTICIPANTS] = self.round_proposers[r]
    voters: DynArray[address, MAX_PARTICIPANTS] = self.round_voters[r]
    n_prop: uint256 = len(proposers)

    # valid proposals, and each revealed ballot in memory (voters x proposers, both bounded)
    valid: uint256 = 0  # bit mask
    n_valid: uint256 = 0
    for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
        p: address = proposers[i]
        if self._valid(r, p, self.digests[r][p]):
            valid |= 1 << i
            n_valid += 1
    ballots: DynArray[Vote, MAX_PARTICIPANTS] = []
    accept_weight: uint256[MAX_PARTICIPANTS] = empty(uint256[MAX_PARTICIPANTS])
    for v: address in voters:
        vote: Vote = self.votes[r][v]
        ballots.append(vote)
        if vote.revealed:
            for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
                if (vote.accepts >> i) & 1 == 1:
                    accept_weight[i] += vote.weight

    # verdicts against the committed ballots: withheld ones count on neither side, a tie
    # decides nothing
    accepted: uint256 = 0  # bit masks
    rejected: uint256 = 0
    for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
        if (valid >> i) & 1 == 0:
            continue
        accept: uint256 = accept_weight[i]
        reject: uint256 = tally.revealed_weight - accept
        if accept * 100 > params.threshold_pct * committed:
            accepted |= 1 << i
        elif reject * 100 > (100 - params.threshold_pct) * committed:
            rejected |= 1 << i
        log ProposalJudged(
            round=r,
            proposer=proposers[i],
            accept_votes=accept,
            reject_votes=reject,
            accepted=(accepted >> i) & 1 == 1,
            rejected=(rejected >> i) & 1 == 1,
        )
    decided: uint256 = accepted | rejected
    outcome: uint256 = OUTCOME_NO_QUORUM
    if n_valid == 0:
        outcome = OUTCOME_NO_PROPOSALS
    elif accepted != 0:
        outcome = OUTCOME_ACCEPTED
    elif rejected != 0:
        outcome = OUTCOME_REJECTED

    # fixed rates: what one accepted proposal earns, what one voter seat earns for matching
    # every decided verdict; never shared among fewer winners, so nobody gains by others losing
    voter_budget: uint256 = reward * params.voter_reward_pct // 100
    per_proposal: uint256 = (reward - voter_budget) // params.proposers_per_round
    per_seat: uint256 = voter_budget // params.voters_per_round

    paid: uint256 = 0
    slashed: uint256 = self.results[r].slashed  # seed no-shows, slashed at the draw
    leaving: DynArray[address, MAX_PARTICIPANTS] = []
    for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
        p: address = proposers[i]
        if (valid >> i) & 1 == 0:
            reason: uint256 = SLASH_NO_PROPOSAL
            if self.digests[r][p] != empty(bytes32):
                reason = SLASH_DUPLICATE_PROPOSAL
            amount: uint256 = 0
            evict: bool = False
            amount, evict = self._no_show(r, p, reason)
            slashed += amount
            if evict:
                leaving.append(p)
        elif (accepted >> i) & 1 == 1:
            self._reward(r, p, per_proposal)
            paid += per_proposal
        elif (rejected >> i) & 1 == 1:
            slashed += self._slash(r, p, params.slash_pct, 1, 1, SLASH_PROPOSAL_REJECTED)

    # a voter's right verdicts: decided proposals where its bit equals the verdict
    n_decided: uint256 = self._popcount(decided)
    for j: uint256 in range(len(voters), bound=MAX_PARTICIPANTS):
        v: address = voters[j]
        vote: Vote = ballots[j]
        if n_valid == 0:
            break  # voting was closed: nobody owed a ballot
        if not vote.revealed:
            amount: uint256 = 0
            evict: bool = False
            amount, evict = self._no_show(r, v, SLASH_VOTE_NOT_REVEALED)
            slashed += amount
            if evict:
                leaving.append(v)
        elif decided != 0:
            wrong: uint256 = self._popcount((vote.accepts ^ accepted) & decided)
            if wrong < n_decided:
                share: uint256 = per_seat * (n_decided - wrong) // n_decided
                self._reward(r, v, share)
                paid += share
            if wrong > 0:
                slashed += self._slash(r, v, params.slash_pct, wrong, n_valid, SLASH_LOSING_VOTE)
    for p: address in leaving:
        self._evict(r, p)

    # the round's budget leaves the pool: what was paid is credited, the rest is burned
    # (slashes were burned as they happened)
    self.pool -= reward
    self.burned += reward - paid
    self.results[r] = RoundResult(
        outcome=outcome, reward=reward, paid=paid, slashed=slashed, accepted=accepted, rejected=rejected
    )
    log RoundFinalized(
        round=r,
        outcome=outcome,
        reward=reward,
        paid=paid,
        slashed=slashed,
        accepted=accepted,
        rejected=rejected,
        committed_weight=committed,
    )
    self._next_round()


# ---------------------------------------------------------------- money out


@external
@nonreentrant
def claim():
    """@notice Pull everything credited so far: rewards, keeper fees, an eviction refund."""
    amount: uint256 = self.rewards[msg.sender]
    assert amount > 0, "claim: nothing to claim"
    self.rewards[msg.sender] = 0
    self.total_unclaimed -= amount
    log Claimed(participant=msg.sender, amount=amount)
    assert extcall token.transfer(msg.sender, amount, default_return_value=True), (
        "claim: token transfer failed"
    )


@external
@nonreentrant
def withdraw():
    """@notice Take the stake back once the task is over (ENDED, CANCELLED or STALLED)."""
    ph: uint256 = self._phase()
    assert ph == PHASE_ENDED or ph == PHASE_CANCELLED or ph == PHASE_STALLED, (
        "withdraw: only in ENDED, CANCELLED or STALLED"
    )
    amount: uint256 = self.stakes[msg.sender]
    assert amount > 0, "withdraw: no stake"
    self.stakes[msg.sender] = 0
    self.total_staked -= amount
    log Withdrawn(participant=msg.sender, stake=amount)
    assert extcall token.transfer(msg.sender, amount, default_return_value=True), (
        "withdraw: token transfer failed"
    )


@external
@nonreentrant
def exit():
    """
    @notice Leave mid-task with the stake less no_show_pct (burned): before committing a
            seed, or while unassigned in a round.
    """
    ph: uint256 = self._phase()
    r: uint256 = self.current_round
    assert self.participant_index[msg.sender] != 0, "exit: not a participant"
    if ph == PHASE_SEED_COMMIT:
        assert self.seed_commitments[r][msg.sender] == empty(bytes32), (
            "exit: seed committed this round"
        )
    elif ph >= PHASE_PROPOSE_COMMIT and ph <= PHASE_AWAIT_FINALIZE:
        assert self.roles[r][msg.sender] == ROLE_NONE, "exit: has a role this round"
    else:
        raise "exit: only in SEED_COMMIT or while unassigned in a round"
    self._remove(msg.sender)
    # leaving early is a missed duty: a squatter that filled registration to exit pays it
    self._slash(r, msg.sender, params.no_show_pct, 1, 1, SLASH_EXIT)
    amount: uint256 = self.stakes[msg.sender]
    self.stakes[msg.sender] = 0
    self.total_staked -= amount
    log Exited(participant=msg.sender, round=r, amount=amount)
    if amount > 0:
        assert extcall token.transfer(msg.sender, amount, default_return_value=True), (
            "exit: token transfer failed"
        )


@external
@nonreentrant
def reclaim_pool():
    """
    @notice The creator takes back what was never spent on a played round: the whole pool
            of a cancelled or never started task; once the task ended or stalled, the
            budgets of rounds never played and the keeper fees nobody earned.
    """
    assert msg.sender == creator, "reclaim_pool: only the creator"
    ph: uint256 = self._phase()
    assert ph == PHASE_CANCELLED or ph == PHASE_ENDED or ph == PHASE_STALLED, (
        "reclaim_pool: only once the task is over (ENDED, CANCELLED or STALLED)"
    )
    amount: uint256 = self.pool
    assert amount > 0, "reclaim_pool: pool is empty"
    self.pool = 0
    log PoolReclaimed(creator=msg.sender, amount=amount)
    assert extcall token.transfer(msg.sender, amount, default_return_value=True), (
        "reclaim_pool: token transfer failed"
    )
