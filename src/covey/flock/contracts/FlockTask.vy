# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title Covey FLock task: stake, draw roles, propose, vote, reward and slash
@license Apache-2.0
@notice One federated fine-tuning task run under FLock's rules.

    Phase machine (`phase()`; every deadline counts blocks from the block that
    opened the stage):

      REGISTRATION  join(amount) with approve + transferFrom, amount >= min_stake,
                    at most max_participants (<= MAX_PARTICIPANTS, a hard cap so
                    every loop is bounded); ends registration_blocks after deploy
      AWAIT_START   anyone calls start(): fewer than min_participants -> CANCELLED
      per round r = 0 .. rounds-1:
        SEED_COMMIT   commit_seed(keccak256(abi_encode(seed, sender)))
        SEED_REVEAL   reveal_seed(seed); the round's entropy is the XOR of all
                      revealed seeds
        AWAIT_DRAW    anyone calls draw_roles(): committed non-revealers are
                      slashed and sit the round out; proposers and voters are drawn
                      from the revealers by a Fisher-Yates shuffle keyed by
                      keccak256(abi_encode(xor, round, this contract)). Too few
                      revealers -> the round is VOID and the next one opens
        PROPOSE       each proposer submits one bytes32 digest (sha2-256 of its
                      update's CID)
        VOTE_COMMIT   each voter commits
                      keccak256(abi_encode(accepts, score, salt, voter))
                      where bit i of `accepts` is its verdict on the
                      proposal of proposers_of(r)[i] (1 accept, 0 reject)
        VOTE_REVEAL   reveal_vote(accepts, score, salt); weight = stake at
                      reveal; every revealed voter judges every proposal
        AWAIT_FINALIZE anyone calls finalize(), which settles the round
      ENDED         after the last round: withdraw() stakes, creator reclaims the
                    pool remainder
      CANCELLED     withdraw() stakes, creator reclaims the pool

    Settlement (finalize): FLock's rule applied to each proposal. The round's
    reward is pool / rounds remaining (this round included). With W the
    revealed vote weight, a submitted proposal is accepted when
    accept_weight * 100 >= threshold_pct * W (its accept_weight: the weight of
    the voters whose bit for it is set). With one proposer per round this is
    exactly FLock's round vote; with several, one bad proposal no longer sinks
    the honest ones beside it.
      ACCEPTED      at least one proposal accepted: the accepted proposers share
                    (100 - voter_reward_pct)% of the reward pro rata to stake;
                    rejected proposers are slashed
      REJECTED      every proposal rejected: their proposers are slashed; the
                    proposers' part stays in the pool
      in both       a voter whose bits match the verdicts on a of the n
                    submitted proposals earns voter_reward_pct% of the reward
                    in proportion to weight * a, and loses
                    slash_pct% * (n - a) / n of its stake (n = 1: the losing
                    side is slashed in full, as FLock)
      NO_PROPOSALS  nobody submitted: voting was closed, nothing is paid
      NO_QUORUM     no revealed vote weight: nothing is paid
    In every outcome, proposers who did not submit and voters who did not reveal
    a vote (including those who never committed one) are slashed, except that
    voters are not slashed in a NO_PROPOSALS round. A slash takes slash_pct% of
    the current stake into the pool. Unpaid reward and rounding dust stay in the
    pool, so later rounds get more. Rewards accrue to `rewards` and are pulled
    with claim(), at any time. A participant with no role may exit() during
    SEED_COMMIT (before committing a seed) or during a round it has no role in;
    an exited address cannot rejoin.

    Trust assumptions:
    - No single participant chooses the roles: the seed is the XOR of every
      revealed seed, and a commitment binds each seed before any is revealed.
      The last revealer can still see the outcome and withhold its seed, which
      changes the draw (one bit of influence), at the price of a slash and of
      sitting the round out. k colluding participants get k such bits.
    - Block producers cannot predict or set the seed. They can reorder or delay
      transactions, which changes nothing: XOR is order-independent and the
      shuffle runs over the registration-order list, which cannot change after
      seeds are revealed (exit() is closed from SEED_REVEAL to the draw). A
      producer able to censor a reveal for the whole SEED_REVEAL window acts
      like a withholding participant (and gets that participant slashed);
      choose windows long enough that no single producer holds them all.
    - Voters are trusted as a stake-weighted majority (FLock's assumption):
      commit-reveal hides votes until the reveal phase, so voters cannot copy
      each other, but a colluding majority of vote weight decides every
      proposal's verdict.
    - The token is trusted to follow EIP-20 (use Covey's Token or a known one);
      every token call comes after the state change it pays for and functions
      that move tokens are @nonreentrant.
    - Digests are not checked on chain: voters fetch the update by its CID and
      judge it off chain.
"""

from ethereum.ercs import IERC20

MAX_PARTICIPANTS: constant(uint256) = 64

PHASE_REGISTRATION: constant(uint256) = 0
PHASE_AWAIT_START: constant(uint256) = 1
PHASE_SEED_COMMIT: constant(uint256) = 2
PHASE_SEED_REVEAL: constant(uint256) = 3
PHASE_AWAIT_DRAW: constant(uint256) = 4
PHASE_PROPOSE: constant(uint256) = 5
PHASE_VOTE_COMMIT: constant(uint256) = 6
PHASE_VOTE_REVEAL: constant(uint256) = 7
PHASE_AWAIT_FINALIZE: constant(uint256) = 8
PHASE_ENDED: constant(uint256) = 9
PHASE_CANCELLED: constant(uint256) = 10

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

SLASH_SEED_NOT_REVEALED: constant(uint256) = 1
SLASH_NO_PROPOSAL: constant(uint256) = 2
SLASH_PROPOSAL_REJECTED: constant(uint256) = 3
SLASH_VOTE_NOT_REVEALED: constant(uint256) = 4
SLASH_LOSING_VOTE: constant(uint256) = 5


struct Params:
    rounds: uint256
    min_participants: uint256
    max_participants: uint256
    min_stake: uint256
    reward_pool: uint256
    proposers_per_round: uint256
    voters_per_round: uint256
    slash_pct: uint256
    threshold_pct: uint256
    voter_reward_pct: uint256
    registration_blocks: uint256
    seed_commit_blocks: uint256
    seed_reveal_blocks: uint256
    propose_blocks: uint256
    vote_commit_blocks: uint256
    vote_reveal_blocks: uint256


struct Vote:
    commitment: bytes32
    revealed: bool
    accepts: uint256  # bit i: accept the proposal of round_proposers[r][i]
    score: uint64
    weight: uint256


struct Tally:
    revealed_stake: uint256  # W: the weight every proposal is judged against
    revealed_count: uint256
    score_sum: uint256


struct RoundResult:
    outcome: uint256
    reward: uint256
    paid: uint256
    slashed: uint256
    accepted: uint256  # bit i: the proposal of round_proposers[r][i] was accepted


event PoolFunded:
    creator: indexed(address)
    amount: uint256

event Joined:
    participant: indexed(address)
    amount: uint256

event TaskStarted:
    participants: uint256

event TaskCancelled:
    participants: uint256

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

event Proposed:
    round: indexed(uint256)
    proposer: indexed(address)
    digest: bytes32

event VoteCommitted:
    round: indexed(uint256)
    voter: indexed(address)
    commitment: bytes32

event VoteRevealed:
    round: indexed(uint256)
    voter: indexed(address)
    accepts: uint256
    score: uint64
    weight: uint256

event ProposalJudged:
    round: indexed(uint256)
    proposer: indexed(address)
    accept_stake: uint256
    reject_stake: uint256
    accepted: bool

event Slashed:
    round: indexed(uint256)
    participant: indexed(address)
    amount: uint256
    reason: uint256

event Rewarded:
    round: indexed(uint256)
    participant: indexed(address)
    amount: uint256

event RoundFinalized:
    round: indexed(uint256)
    outcome: uint256
    reward: uint256  # pool / rounds left, at finalize
    paid: uint256  # rewards credited this round
    slashed: uint256  # every slash of the round, the draw's included
    accepted: uint256  # bit i: the proposal of proposers_of(round)[i] was accepted
    revealed_stake: uint256

event TaskEnded:
    pool: uint256

event Claimed:
    participant: indexed(address)
    amount: uint256

event Withdrawn:
    participant: indexed(address)
    amount: uint256

event Exited:
    participant: indexed(address)
    round: uint256
    amount: uint256

event PoolReclaimed:
    creator: indexed(address)
    amount: uint256


token: public(immutable(IERC20))
creator: public(immutable(address))
params: public(immutable(Params))
registration_end: public(immutable(uint256))

stage: uint256
stage_start: public(uint256)
current_round: public(uint256)
pool: public(uint256)
total_staked: public(uint256)
total_unclaimed: public(uint256)

participants: DynArray[address, MAX_PARTICIPANTS]
participant_index: HashMap[address, uint256]  # position + 1; 0 = not a participant
joined: public(HashMap[address, bool])  # ever joined; exited addresses stay True
stakes: public(HashMap[address, uint256])
rewards: public(HashMap[address, uint256])

seed_commitments: HashMap[uint256, HashMap[address, bytes32]]
seed_revealed: HashMap[uint256, HashMap[address, bool]]
seed_xor: HashMap[uint256, uint256]
round_seed: public(HashMap[uint256, bytes32])

roles: HashMap[uint256, HashMap[address, uint256]]
round_proposers: HashMap[uint256, DynArray[address, MAX_PARTICIPANTS]]
round_voters: HashMap[uint256, DynArray[address, MAX_PARTICIPANTS]]
digests: HashMap[uint256, HashMap[address, bytes32]]
proposal_count: public(HashMap[uint256, uint256])
votes: HashMap[uint256, HashMap[address, Vote]]
tallies: HashMap[uint256, Tally]
results: HashMap[uint256, RoundResult]


@deploy
def __init__(token_: IERC20, p: Params):
    assert p.rounds >= 1, "init: rounds must be at least 1"
    assert p.max_participants <= MAX_PARTICIPANTS, "init: max_participants above the hard cap"
    assert p.min_participants <= p.max_participants, "init: min_participants above max"
    assert p.proposers_per_round >= 1, "init: need at least one proposer per round"
    assert p.voters_per_round >= 1, "init: need at least one voter per round"
    assert p.proposers_per_round + p.voters_per_round <= p.min_participants, (
        "init: proposers + voters exceed min_participants"
    )
    assert p.min_stake >= 1, "init: min_stake must be positive"
    assert p.slash_pct <= 100, "init: slash_pct above 100"
    assert p.threshold_pct >= 1 and p.threshold_pct <= 100, "init: threshold_pct not in 1..100"
    assert p.voter_reward_pct <= 100, "init: voter_reward_pct above 100"
    assert p.registration_blocks >= 1 and p.seed_commit_blocks >= 1, "init: durations must be >= 1"
    assert p.seed_reveal_blocks >= 1 and p.propose_blocks >= 1, "init: durations must be >= 1"
    assert p.vote_commit_blocks >= 1 and p.vote_reveal_blocks >= 1, "init: durations must be >= 1"
    token = token_
    creator = msg.sender
    params = p
    registration_end = block.number + p.registration_blocks
    self.pool = p.reward_pool
    log PoolFunded(creator=msg.sender, amount=p.reward_pool)
    if p.reward_pool > 0:
        assert extcall token_.transferFrom(msg.sender, self, p.reward_pool, default_return_value=True), (
            "init: reward pool transfer failed"
        )


# ---------------------------------------------------------------- views


@internal
@view
def _phase() -> uint256:
    stage: uint256 = self.stage
    if stage == STAGE_REGISTRATION:
        if block.number < registration_end:
            return PHASE_REGISTRATION
        return PHASE_AWAIT_START
    if stage == STAGE_SEEDING:
        end: uint256 = self.stage_start + params.seed_commit_blocks
        if block.number < end:
            return PHASE_SEED_COMMIT
        if block.number < end + params.seed_reveal_blocks:
            return PHASE_SEED_REVEAL
        return PHASE_AWAIT_DRAW
    if stage == STAGE_ROUND:
        end: uint256 = self.stage_start + params.propose_blocks
        if block.number < end:
            return PHASE_PROPOSE
        end += params.vote_commit_blocks
        if block.number < end:
            return PHASE_VOTE_COMMIT
        if block.number < end + params.vote_reveal_blocks:
            return PHASE_VOTE_REVEAL
        return PHASE_AWAIT_FINALIZE
    if stage == STAGE_ENDED:
        return PHASE_ENDED
    return PHASE_CANCELLED


@external
@view
def phase() -> uint256:
    """@notice The current phase (see the PHASE_* constants) at this block."""
    return self._phase()


@external
@view
def phase_end() -> uint256:
    """@notice First block outside the current timed phase; 0 if it waits for a call."""
    ph: uint256 = self._phase()
    start: uint256 = self.stage_start
    if ph == PHASE_REGISTRATION:
        return registration_end
    if ph == PHASE_SEED_COMMIT:
        return start + params.seed_commit_blocks
    if ph == PHASE_SEED_REVEAL:
        return start + params.seed_commit_blocks + params.seed_reveal_blocks
    if ph == PHASE_PROPOSE:
        return start + params.propose_blocks
    if ph == PHASE_VOTE_COMMIT:
        return start + params.propose_blocks + params.vote_commit_blocks
    if ph == PHASE_VOTE_REVEAL:
        return start + params.propose_blocks + params.vote_commit_blocks + params.vote_reveal_blocks
    return 0


@external
@view
def round_reward() -> uint256:
    """@notice The reward the current round would pay out in full, at today's pool."""
    r: uint256 = self.current_round
    if r >= params.rounds:
        return 0
    return self.pool // (params.rounds - r)


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
def proposals(r: uint256) -> (DynArray[address, MAX_PARTICIPANTS], DynArray[bytes32, MAX_PARTICIPANTS]):
    """@notice The proposers of round r that submitted, and their digests, in draw order."""
    who: DynArray[address, MAX_PARTICIPANTS] = []
    what: DynArray[bytes32, MAX_PARTICIPANTS] = []
    for p: address in self.round_proposers[r]:
        d: bytes32 = self.digests[r][p]
        if d != empty(bytes32):
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
def _slash(r: uint256, who: address, reason: uint256) -> uint256:
    return self._slash_part(r, who, 1, 1, reason)


@internal
def _slash_part(r: uint256, who: address, parts: uint256, whole: uint256, reason: uint256) -> uint256:
    """Move parts/whole of slash_pct% of the stake into the pool (a voter wrong on `parts` of
    `whole` proposals loses that share of a full slash)."""
    amount: uint256 = self.stakes[who] * params.slash_pct * parts // (100 * whole)
    self.stakes[who] -= amount
    self.total_staked -= amount
    self.pool += amount
    log Slashed(round=r, participant=who, amount=amount, reason=reason)
    return amount


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
def _reward(r: uint256, who: address, amount: uint256):
    self.rewards[who] += amount
    self.total_unclaimed += amount
    log Rewarded(round=r, participant=who, amount=amount)


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
def join(amount: uint256):
    """@notice Stake `amount` (approve it first) and register for the task."""
    assert self._phase() == PHASE_REGISTRATION, "join: only in REGISTRATION"
    assert not self.joined[msg.sender], "join: already joined"
    assert amount >= params.min_stake, "join: stake below min_stake"
    assert len(self.participants) < params.max_participants, "join: task is full"
    self.joined[msg.sender] = True
    self.participants.append(msg.sender)
    self.participant_index[msg.sender] = len(self.participants)
    self.stakes[msg.sender] = amount
    self.total_staked += amount
    log Joined(participant=msg.sender, amount=amount)
    assert extcall token.transferFrom(msg.sender, self, amount, default_return_value=True), (
        "join: token transfer failed"
    )


@external
def start():
    """@notice Close registration: start round 0, or cancel if too few joined."""
    assert self._phase() == PHASE_AWAIT_START, "start: only in AWAIT_START"
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
    """@notice Reveal the committed seed; it is XORed into the round's entropy."""
    assert self._phase() == PHASE_SEED_REVEAL, "reveal_seed: only in SEED_REVEAL"
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
    """@notice Slash seed withholders, then draw this round's proposers and voters."""
    assert self._phase() == PHASE_AWAIT_DRAW, "draw_roles: only in AWAIT_DRAW"
    r: uint256 = self.current_round
    eligible: DynArray[address, MAX_PARTICIPANTS] = []
    withheld: uint256 = 0
    for p: address in self.participants:
        if self.seed_revealed[r][p]:
            eligible.append(p)
        elif self.seed_commitments[r][p] != empty(bytes32):
            withheld += self._slash(r, p, SLASH_SEED_NOT_REVEALED)
    # finalize adds its own slashes to these
    self.results[r].slashed = withheld
    n: uint256 = len(eligible)
    n_prop: uint256 = params.proposers_per_round
    need: uint256 = n_prop + params.voters_per_round
    if n < need:
        self.results[r].outcome = OUTCOME_VOID
        log RoundFinalized(
            round=r, outcome=OUTCOME_VOID, reward=0, paid=0, slashed=withheld, accepted=0, revealed_stake=0
        )
        self._next_round()
        return
    seed: bytes32 = keccak256(abi_encode(self.seed_xor[r], r, self))
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
def propose(digest: bytes32):
    """@notice Submit the sha2-256 digest of this round's update CID (once)."""
    assert self._phase() == PHASE_PROPOSE, "propose: only in PROPOSE"
    r: uint256 = self.current_round
    assert self.roles[r][msg.sender] == ROLE_PROPOSER, "propose: not a proposer this round"
    assert digest != empty(bytes32), "propose: empty digest"
    assert self.digests[r][msg.sender] == empty(bytes32), "propose: already proposed"
    self.digests[r][msg.sender] = digest
    self.proposal_count[r] += 1
    log Proposed(round=r, proposer=msg.sender, digest=digest)


@external
def commit_vote(commitment: bytes32):
    """@notice Commit keccak256(abi_encode(accepts, score, salt, sender)) (once)."""
    assert self._phase() == PHASE_VOTE_COMMIT, "commit_vote: only in VOTE_COMMIT"
    r: uint256 = self.current_round
    assert self.roles[r][msg.sender] == ROLE_VOTER, "commit_vote: not a voter this round"
    assert self.proposal_count[r] > 0, "commit_vote: no proposals this round"
    assert commitment != empty(bytes32), "commit_vote: empty commitment"
    assert self.votes[r][msg.sender].commitment == empty(bytes32), "commit_vote: already voted"
    self.votes[r][msg.sender].commitment = commitment
    log VoteCommitted(round=r, voter=msg.sender, commitment=commitment)


@external
def reveal_vote(accepts: uint256, score: uint64, salt: bytes32):
    """
    @notice Open the committed vote; it counts with the voter's current stake.
    @param accepts bit i set: accept the proposal of proposers_of(round)[i]; bits of
           proposers that did not submit are ignored; bits at or above
           len(proposers_of(round)) are refused
    """
    assert self._phase() == PHASE_VOTE_REVEAL, "reveal_vote: only in VOTE_REVEAL"
    r: uint256 = self.current_round
    vote: Vote = self.votes[r][msg.sender]
    assert vote.commitment != empty(bytes32), "reveal_vote: no vote committed"
    assert not vote.revealed, "reveal_vote: already revealed"
    assert keccak256(abi_encode(accepts, score, salt, msg.sender)) == vote.commitment, (
        "reveal_vote: vote does not match commitment"
    )
    assert accepts >> len(self.round_proposers[r]) == 0, (
        "reveal_vote: accepts has bits beyond the round's proposers"
    )
    weight: uint256 = self.stakes[msg.sender]
    self.votes[r][msg.sender] = Vote(
        commitment=vote.commitment, revealed=True, accepts=accepts, score=score, weight=weight
    )
    t: Tally = self.tallies[r]
    t.revealed_stake += weight
    t.revealed_count += 1
    t.score_sum += convert(score, uint256)
    self.tallies[r] = t
    log VoteRevealed(round=r, voter=msg.sender, accepts=accepts, score=score, weight=weight)


@external
def finalize():
    """@notice Settle the round (anyone, after VOTE_REVEAL): judge, pay, slash, open the next."""
    assert self._phase() == PHASE_AWAIT_FINALIZE, "finalize: only in AWAIT_FINALIZE"
    r: uint256 = self.current_round
    reward: uint256 = self.pool // (params.rounds - r)
    total: uint256 = self.tallies[r].revealed_stake
    proposers: DynArray[address, MAX_PARTICIPANTS] = self.round_proposers[r]
    voters: DynArray[address, MAX_PARTICIPANTS] = self.round_voters[r]
    n_prop: uint256 = len(proposers)

    # which proposals were submitted, and the weight accepting each (voters x proposers,
    # both bounded by MAX_PARTICIPANTS, in memory)
    submitted: uint256 = 0  # bit mask
    n_submitted: uint256 = 0
    for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
        if self.digests[r][proposers[i]] != empty(bytes32):
            submitted |= 1 << i
            n_submitted += 1
    accept_weight: uint256[MAX_PARTICIPANTS] = empty(uint256[MAX_PARTICIPANTS])
    for v: address in voters:
        vote: Vote = self.votes[r][v]
        if vote.revealed:
            for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
                if (vote.accepts >> i) & 1 == 1:
                    accept_weight[i] += vote.weight

    accepted: uint256 = 0  # bit mask
    accepted_stake: uint256 = 0
    outcome: uint256 = OUTCOME_REJECTED
    if n_submitted == 0:
        outcome = OUTCOME_NO_PROPOSALS
    elif total == 0:
        outcome = OUTCOME_NO_QUORUM
    else:
        for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
            if (submitted >> i) & 1 == 1:
                ok: bool = accept_weight[i] * 100 >= params.threshold_pct * total
                if ok:
                    accepted |= 1 << i
                    accepted_stake += self.stakes[proposers[i]]
                log ProposalJudged(
                    round=r,
                    proposer=proposers[i],
                    accept_stake=accept_weight[i],
                    reject_stake=total - accept_weight[i],
                    accepted=ok,
                )
        if accepted != 0:
            outcome = OUTCOME_ACCEPTED
    decided: bool = outcome == OUTCOME_ACCEPTED or outcome == OUTCOME_REJECTED

    voter_budget: uint256 = 0
    if decided:
        voter_budget = reward * params.voter_reward_pct // 100
    proposer_budget: uint256 = 0
    if outcome == OUTCOME_ACCEPTED:
        proposer_budget = reward - voter_budget

    paid: uint256 = 0
    slashed: uint256 = self.results[r].slashed  # seed withholders, slashed at the draw
    for i: uint256 in range(n_prop, bound=MAX_PARTICIPANTS):
        p: address = proposers[i]
        if (submitted >> i) & 1 == 0:
            slashed += self._slash(r, p, SLASH_NO_PROPOSAL)
        elif (accepted >> i) & 1 == 1:
            if accepted_stake > 0:
                share: uint256 = proposer_budget * self.stakes[p] // accepted_stake
                self._reward(r, p, share)
                paid += share
        elif decided:
            slashed += self._slash(r, p, SLASH_PROPOSAL_REJECTED)

    # a voter's agreements: submitted proposals where its bit equals the verdict
    agreement_weight: uint256 = 0
    if decided:
        for v: address in voters:
            vote: Vote = self.votes[r][v]
            if vote.revealed:
                agreed: uint256 = n_submitted - self._popcount((vote.accepts ^ accepted) & submitted)
                agreement_weight += vote.weight * agreed
    for v: address in voters:
        vote: Vote = self.votes[r][v]
        if not vote.revealed:
            if n_submitted > 0:
                slashed += self._slash(r, v, SLASH_VOTE_NOT_REVEALED)
        elif decided:
            wrong: uint256 = self._popcount((vote.accepts ^ accepted) & submitted)
            if wrong < n_submitted and agreement_weight > 0:
                share: uint256 = voter_budget * vote.weight * (n_submitted - wrong) // agreement_weight
                self._reward(r, v, share)
                paid += share
            if wrong > 0:
                slashed += self._slash_part(r, v, wrong, n_submitted, SLASH_LOSING_VOTE)

    # slashes were added to the pool as they happened; payments leave it here
    self.pool -= paid
    self.results[r] = RoundResult(
        outcome=outcome, reward=reward, paid=paid, slashed=slashed, accepted=accepted
    )
    log RoundFinalized(
        round=r,
        outcome=outcome,
        reward=reward,
        paid=paid,
        slashed=slashed,
        accepted=accepted,
        revealed_stake=total,
    )
    self._next_round()


# ---------------------------------------------------------------- money out


@external
@nonreentrant
def claim():
    """@notice Pull every reward credited so far."""
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
    """@notice Take the stake back once the task has ended or was cancelled."""
    stage: uint256 = self.stage
    assert stage == STAGE_ENDED or stage == STAGE_CANCELLED, "withdraw: only in ENDED or CANCELLED"
    amount: uint256 = self.stakes[msg.sender]
    assert amount > 0, "withdraw: no stake"
    self.stakes[msg.sender] = 0
    self.total_staked -= amount
    log Withdrawn(participant=msg.sender, amount=amount)
    assert extcall token.transfer(msg.sender, amount, default_return_value=True), (
        "withdraw: token transfer failed"
    )


@external
@nonreentrant
def exit():
    """@notice Leave mid-task with the stake: before committing a seed, or while unassigned."""
    ph: uint256 = self._phase()
    r: uint256 = self.current_round
    index: uint256 = self.participant_index[msg.sender]
    assert index != 0, "exit: not a participant"
    if ph == PHASE_SEED_COMMIT:
        assert self.seed_commitments[r][msg.sender] == empty(bytes32), (
            "exit: seed committed this round"
        )
    elif ph >= PHASE_PROPOSE and ph <= PHASE_AWAIT_FINALIZE:
        assert self.roles[r][msg.sender] == ROLE_NONE, "exit: has a role this round"
    else:
        raise "exit: only in SEED_COMMIT or while unassigned in a round"
    last: address = self.participants.pop()
    if last != msg.sender:
        self.participants[index - 1] = last
        self.participant_index[last] = index
    self.participant_index[msg.sender] = 0
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
    """@notice The creator takes back what is left of the pool after the task."""
    assert msg.sender == creator, "reclaim_pool: only the creator"
    stage: uint256 = self.stage
    assert stage == STAGE_ENDED or stage == STAGE_CANCELLED, "reclaim_pool: only in ENDED or CANCELLED"
    amount: uint256 = self.pool
    assert amount > 0, "reclaim_pool: pool is empty"
    self.pool = 0
    log PoolReclaimed(creator=msg.sender, amount=amount)
    assert extcall token.transfer(msg.sender, amount, default_return_value=True), (
        "reclaim_pool: token transfer failed"
    )
