"""The region map's data: regions, shards, placements. Immutable snapshots.

Every record has `to_json()` / `from_json()`; the JSON uses the API's camelCase
names (`gatewayUrl`, `primaryRegion`, ...). Mappings inside records are
read-only views over private copies, so a snapshot shared by every request
of a gateway cannot be changed by any of them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from common.lsn import lsn_to_int

ROUTING_PREFIX_BYTES = 8  # a booking id shares this many leading bytes with its event id
UNKNOWN_DISTANCE_MS = 10_000  # regions with no latency figure sort after every known one


class MapError(Exception):
    """The map store failed (unreachable, timed out, refused, or returned nonsense)."""


class CasConflict(MapError):
    """A check-and-set write lost: the key changed, or exists, since it was read."""

    def __init__(self, key: str, expected_index: int, attempts: int = 1) -> None:
        if attempts > 1:
            what = f"lost {attempts} times in a row"
        elif expected_index:
            what = f"lost: it no longer has modify index {expected_index}"
        else:
            what = "lost: it already exists"
        super().__init__(f"check-and-set on {key!r} {what}")
        self.key = key
        self.expected_index = expected_index
        self.attempts = attempts


class NotFound(MapError):
    """The record asked for is not in the map."""


class EpochRuleViolation(MapError):
    """A shard write broke the epoch rules (`check_epoch_rules`); nothing was written."""

    def __init__(self, shard: str, stored: tuple[int, str] | None, offered: tuple[int, str],
                 rule: str) -> None:
        was = "no record" if stored is None else f"epoch {stored[0]}, primary {stored[1]}"
        super().__init__(f"shard {shard}: refused epoch {offered[0]} with primary {offered[1]} "
                         f"over {was}: {rule}")
        self.shard, self.stored, self.offered, self.rule = shard, stored, offered, rule


class SessionGone(MapError):
    """The store's session (a lock holder's lease) no longer exists: it expired or was
    destroyed, and every lock it held is released."""


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def check_name(kind: str, name: str) -> str:
    """Names become KV key segments: non-empty, no '/', no surrounding blanks."""
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
        raise ValueError(f"invalid {kind} name: {name!r}")
    return name


# Keys relative to the store's prefix; `RegionMap.key_indexes` uses them too.
def region_key(name: str) -> str:
    return f"regions/{check_name('region', name)}"


def shard_key(name: str) -> str:
    return f"shards/{check_name('shard', name)}"


def placement_key(event_id: str) -> str:
    return f"placement/{check_name('event', event_id)}"


# Keys relative to the store's operations prefix (`MapStore.ops_prefix`).
def journal_key(op_id: str) -> str:
    return f"journals/{check_name('operation', op_id)}"


def lock_key(name: str) -> str:
    return f"locks/{check_name('lock', name)}"


@dataclass(frozen=True)
class Region:
    name: str
    gateway_url: str
    location: str
    latency_ms: Mapping[str, int] = field(default_factory=dict)  # simulated distance to others

    def __post_init__(self) -> None:
        check_name("region", self.name)
        object.__setattr__(self, "latency_ms", _frozen(self.latency_ms))

    def distance_to(self, other: str) -> int:
        return 0 if other == self.name else self.latency_ms.get(other, UNKNOWN_DISTANCE_MS)

    def nearest(self, regions: Iterable[str]) -> list[str]:
        """`regions` ordered by distance from this one: itself first, unknown ones last."""
        return sorted(regions, key=lambda r: (self.distance_to(r), r))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gatewayUrl": self.gateway_url, "location": self.location,
                "latencyMs": dict(self.latency_ms)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Region:
        return cls(str(doc["name"]), str(doc["gatewayUrl"]), str(doc.get("location", "")),
                   {str(k): int(v) for k, v in (doc.get("latencyMs") or {}).items()})


FIRST_ZONE = "a"


def copy_key(region: str, zone: str = FIRST_ZONE) -> str:
    """A copy's name within its shard: its region for the region's first zone, else
    `region/zone` (a home region's second-zone copy, the zone standby: `us-east/b`)."""
    return region if zone == FIRST_ZONE else f"{region}/{zone}"


@dataclass(frozen=True)
class ShardMember:
    """A shard's copy: where it lives (region, zone), its booking service and its
    database ("host:port"). `key` names it within the shard (`copy_key`)."""

    region: str
    service_url: str
    db_address: str
    zone: str = FIRST_ZONE

    def __post_init__(self) -> None:
        check_name("region", self.region)
        check_name("zone", self.zone)

    @property
    def key(self) -> str:
        return copy_key(self.region, self.zone)

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "zone": self.zone, "serviceUrl": self.service_url,
                "dbAddress": self.db_address}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ShardMember:
        return cls(str(doc["region"]), str(doc["serviceUrl"]), str(doc["dbAddress"]),
                   str(doc.get("zone") or FIRST_ZONE))


SYNC_MODES = ("zone", "region", "off")  # see Shard.sync_mode
_LSN = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")  # Postgres prints an LSN as 'X/Y'
TRANSITION_KINDS = ("switchover",)


@dataclass(frozen=True)
class Transition:
    """A planned change of primary under way (`Shard.transition`): while it is set the
    gateways hold the shard's writes (gateway/ride_through.py) instead of sending them to
    a primary that is shutting down. Written and cleared by check-and-set like the rest of
    the record, at the same primary and epoch; the change of primary that ends it clears
    it in the same write (`Shard.promoted`), so the map change that names the new primary
    is the one that releases the held writes.

    - `kind`: 'switchover';
    - `target`: the copy (key in `members`) that is to become the primary;
    - `since`: when it began (ISO 8601, UTC) by the writer's clock: for people to read,
      never to decide with (no clock of another host is trusted);
    - `epoch`: the shard epoch it began at (always the record's own epoch);
    - `owner`: who runs it (the runner's name, host and pid; '' in records written
      before owners were).

    Whether one is abandoned is judged by each observer (a gateway, the controller) on
    its own monotonic clock, from when it first saw this very transition
    (common/observed.py): the record as a whole, owner and `since` included, is its
    identity, so a new transition is new to everyone.
    """

    kind: str
    target: str
    since: str
    epoch: int
    owner: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TRANSITION_KINDS:
            raise ValueError(f"transition kind {self.kind!r} is not one of {TRANSITION_KINDS}")

    def age_seconds(self, now: datetime | None = None) -> float:
        """Seconds since `since` by this host's wall clock (0 when it does not parse): for
        display only; nothing decides by it."""
        try:
            began = datetime.fromisoformat(self.since.replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        if began.tzinfo is None:
            began = began.replace(tzinfo=UTC)
        return ((now or datetime.now(UTC)) - began).total_seconds()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "target": self.target, "since": self.since,
                               "epoch": self.epoch}
        if self.owner:
            doc["owner"] = self.owner
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Transition:
        return cls(str(doc["kind"]), str(doc["target"]), str(doc["since"]), int(doc["epoch"]),
                   str(doc.get("owner") or ""))

    @classmethod
    def begin(cls, kind: str, target: str, epoch: int, owner: str = "") -> Transition:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return cls(kind, target, now, epoch, owner)


@dataclass(frozen=True)
class Shard:
    """One shard: its copies (`members`, by copy key: see `copy_key`), which of them is
    the primary (`primary_copy`), every other member a streaming replica. `epoch`
    grows by exactly one at every change of primary.

    - `sync_standbys`: the members (by their key in `members`) in the primary's
      synchronous standby set: each holds every commit the primary confirmed, so
      each may be promoted without loss. Empty: none (nothing may be promoted
      without `--force`). Never the primary itself. Kept sorted.
    - `epoch_lsn`: the WAL position ('X/Y') at which the current epoch began,
      written by the promotion; None when not known (a record written before
      promotions recorded it, or a change of primary that did not say).
    - `sync_mode`: the durability asked for by the topology ('zone', 'region',
      'off'; see docs/region-map.md). It says what the set should be, the set
      says what it is.
    - `transition`: a planned change of primary under way (`Transition`), or None.
      It belongs to the record's epoch and names a replica as its target.
    """

    name: str
    epoch: int
    primary_copy: str
    members: Mapping[str, ShardMember]  # copy key -> copy
    sync_standbys: tuple[str, ...] = ()
    epoch_lsn: str | None = None
    sync_mode: str = "zone"
    transition: Transition | None = None

    def __post_init__(self) -> None:
        check_name("shard", self.name)
        object.__setattr__(self, "members", _frozen(self.members))
        # Dataclass fields are not checked at run time, and an untyped caller's str would
        # pass as its characters: refuse it by what it is, not by what the field claims.
        standbys: object = self.sync_standbys
        if isinstance(standbys, str):
            raise ValueError(f"shard {self.name}: sync_standbys must be a sequence of member keys")
        object.__setattr__(self, "sync_standbys", tuple(sorted(set(self.sync_standbys))))
        if self.epoch < 0:
            raise ValueError(f"shard {self.name}: negative epoch {self.epoch}")
        if self.primary_copy not in self.members:
            raise ValueError(f"shard {self.name}: primary {self.primary_copy} is not a member")
        for key, member in self.members.items():
            if member.key != key:
                raise ValueError(f"shard {self.name}: copy {member.key} filed under {key}")
        for standby in self.sync_standbys:
            if standby not in self.members or standby == self.primary_copy:
                raise ValueError(f"shard {self.name}: synchronous standby {standby!r} is not a replica")
        if self.epoch_lsn is not None and not _LSN.fullmatch(self.epoch_lsn):
            raise ValueError(f"shard {self.name}: epoch LSN {self.epoch_lsn!r} is not 'X/Y'")
        if self.sync_mode not in SYNC_MODES:
            raise ValueError(f"shard {self.name}: sync mode {self.sync_mode!r} is not one of {SYNC_MODES}")
        if self.transition is not None:
            if self.transition.target not in self.members or self.transition.target == self.primary_copy:
                raise ValueError(f"shard {self.name}: transition target {self.transition.target!r} "
                                 "is not a replica")
            if self.transition.epoch != self.epoch:
                raise ValueError(f"shard {self.name}: a transition begun at epoch "
                                 f"{self.transition.epoch} in a record at epoch {self.epoch}")

    @property
    def primary(self) -> ShardMember:
        return self.members[self.primary_copy]

    @property
    def primary_region(self) -> str:
        """The region of the primary: where this shard's writes go (its home now)."""
        return self.primary.region

    @property
    def home_region(self) -> str:
        return self.primary_region

    @property
    def replicas(self) -> dict[str, ShardMember]:
        return {k: m for k, m in self.members.items() if k != self.primary_copy}

    def replica_in(self, region: str) -> ShardMember | None:
        """The streaming replica serving `region` (its first-zone copy; None when there is
        none, or it is the primary)."""
        return None if region == self.primary_copy else self.members.get(region)

    def copies_in(self, region: str) -> list[ShardMember]:
        """Every copy in `region`, the primary first, then by zone."""
        return sorted((m for m in self.members.values() if m.region == region),
                      key=lambda m: (m.key != self.primary_copy, m.zone))

    def resolve_copy(self, name: str) -> str:
        """The copy key `name` means: a copy key (`us-east`, `us-east/b`), or `region/zone`
        spelled out for a first zone (`us-east/a`). ValueError when there is none."""
        region, _, zone = name.partition("/")
        key = copy_key(region, zone or FIRST_ZONE)
        if key not in self.members:
            raise ValueError(f"shard {self.name} has no copy {name!r} "
                             f"(copies: {', '.join(sorted(self.members))})")
        return key

    def with_primary(self, copy: str) -> Shard:
        """The shard after promoting `copy` (a copy key): a new primary, so epoch + 1.
        Naming the current primary is no change (same shard, same epoch).

        The new epoch's start LSN is unknown (None) and the synchronous set is
        emptied: a standby of the old primary is not known to hold what the new
        one confirms until the new primary is configured. A promotion that knows
        both uses `promoted()`.
        """
        if copy == self.primary_copy:
            return self
        return self.promoted(copy, None, ())

    def promoted(self, copy: str, epoch_lsn: str | None, sync_standbys: Iterable[str]) -> Shard:
        """The record a promotion of `copy` writes: that copy is the primary, the epoch
        is one more, `epoch_lsn` is where the new epoch's WAL begins, `sync_standbys`
        the set the new primary was configured with. A transition ends with it (cleared)."""
        if copy not in self.members:
            raise ValueError(f"shard {self.name} has no copy {copy}")
        if copy == self.primary_copy:
            raise ValueError(f"shard {self.name}: {copy} is the primary already")
        return replace(self, primary_copy=copy, epoch=self.epoch + 1, epoch_lsn=epoch_lsn,
                       sync_standbys=tuple(sync_standbys), transition=None)

    def with_transition(self, transition: Transition | None) -> Shard:
        """The same primary and epoch, with a transition begun (or, with None, ended)."""
        return replace(self, transition=transition)

    def with_sync_standbys(self, sync_standbys: Iterable[str]) -> Shard:
        """The same primary and epoch with another synchronous standby set (the primary's
        `synchronous_standby_names` changed)."""
        return replace(self, sync_standbys=tuple(sync_standbys))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "primary": self.primary_copy,
                "primaryRegion": self.primary_region,
                "members": {k: m.to_json() for k, m in self.members.items()},
                "syncStandbys": list(self.sync_standbys), "epochLsn": self.epoch_lsn,
                "syncMode": self.sync_mode,
                "transition": None if self.transition is None else self.transition.to_json()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Shard:
        """Records written before the synchronous set existed load with the defaults (and
        those before copies had zones name the primary by its region, and those before
        transitions have none)."""
        lsn = doc.get("epochLsn")
        transition = doc.get("transition")
        return cls(str(doc["name"]), int(doc["epoch"]), str(doc.get("primary") or doc["primaryRegion"]),
                   {str(k): ShardMember.from_json(m) for k, m in doc["members"].items()},
                   tuple(str(m) for m in doc.get("syncStandbys") or ()),
                   None if lsn is None else str(lsn),
                   str(doc.get("syncMode") or "zone"),
                   Transition.from_json(transition) if transition else None)


def check_epoch_rules(stored: Shard | None, offered: Shard) -> None:
    """The epoch rules every shard write obeys; `EpochRuleViolation` otherwise.

    - a new record (`stored` None) may start at any epoch >= 1;
    - a change of primary carries exactly `stored.epoch + 1`;
    - a write that keeps the primary keeps the epoch;
    so an epoch never decreases and never skips, and every epoch names one primary.
    """
    offer = (offered.epoch, offered.primary_copy)
    if stored is None:
        if offered.epoch < 1:
            raise EpochRuleViolation(offered.name, None, offer, "a new shard starts at epoch 1 or more")
        return
    was = (stored.epoch, stored.primary_copy)
    if offered.primary_copy != stored.primary_copy:
        if offered.epoch != stored.epoch + 1:
            raise EpochRuleViolation(offered.name, was, offer,
                                     f"a change of primary must carry epoch {stored.epoch + 1}")
    elif offered.epoch != stored.epoch:
        raise EpochRuleViolation(offered.name, was, offer,
                                 f"the same primary keeps epoch {stored.epoch}")


@dataclass(frozen=True)
class Placement:
    """Event → shard. One KV key per event, so placing or moving one event touches no other.

    `since_lsn`: for an event moved onto `shard`, the WAL position of that shard's primary
    once the event's rows were all there (event_ops/move.py). A copy of the shard that has
    not replayed up to it may lack them, or show tiers as they were before the last copy:
    a gateway reads the event from a copy only once it has (read-your-writes across a move).
    """

    event_id: str
    shard: str
    since_lsn: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"eventId": self.event_id, "shard": self.shard}
        if self.since_lsn:
            doc["sinceLsn"] = self.since_lsn
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Placement:
        lsn = doc.get("sinceLsn")
        return cls(str(doc["eventId"]), str(doc["shard"]), str(lsn) if lsn else None)


@dataclass(frozen=True)
class RegionMap:
    """A complete snapshot of the map as Consul had it at `index`.

    `key_indexes` holds the ModifyIndex of every record it was built from, by
    relative key ("shards/shard-a"): pass it as `expected_index` to write that
    record back with check-and-set (the `*_index` helpers give 0 for a record
    that does not exist, which is what creating it needs).
    """

    regions: Mapping[str, Region] = field(default_factory=dict)
    shards: Mapping[str, Shard] = field(default_factory=dict)
    placements: Mapping[str, str] = field(default_factory=dict)  # event id -> shard name
    index: int = 0
    key_indexes: Mapping[str, int] = field(default_factory=dict)
    placement_lsns: Mapping[str, str] = field(default_factory=dict)  # moved event -> sinceLsn
    _by_prefix: Mapping[bytes, str] = field(default_factory=dict, repr=False, compare=False)
    _moved_onto: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("regions", "shards", "placements", "key_indexes", "placement_lsns"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        by_prefix: dict[bytes, str] = {}
        for event_id in sorted(self.placements):  # sorted: every gateway resolves alike
            try:
                by_prefix.setdefault(uuid.UUID(event_id).bytes[:ROUTING_PREFIX_BYTES], event_id)
            except ValueError:
                continue  # not a UUID: it has no bookings routed by prefix
        object.__setattr__(self, "_by_prefix", MappingProxyType(by_prefix))
        latest: dict[str, tuple[int, str]] = {}  # shard -> the latest sinceLsn moved onto it
        for event_id, lsn in self.placement_lsns.items():
            shard = self.placements.get(event_id)
            try:
                position = lsn_to_int(lsn)
            except ValueError:
                continue  # a malformed sinceLsn asks nothing of the copies
            if shard is not None and position > latest.get(shard, (-1, ""))[0]:
                latest[shard] = (position, lsn)
        object.__setattr__(self, "_moved_onto", MappingProxyType({s: v[1] for s, v in latest.items()}))

    def shard_for_event(self, event_id: str) -> Shard | None:
        name = self.placements.get(event_id)
        return self.shards.get(name) if name is not None else None

    def placement(self, event_id: str) -> Placement | None:
        name = self.placements.get(event_id)
        if name is None:
            return None
        return Placement(event_id, name, self.placement_lsns.get(event_id))

    def moved_since_lsn(self, shard: str) -> str | None:
        """The latest `sinceLsn` of the events moved onto `shard`: a copy of the shard that
        has replayed it has every moved event's rows as their move left them."""
        return self._moved_onto.get(shard)

    def event_ids(self) -> list[str]:
        return list(self.placements)

    def event_for_prefix(self, prefix: bytes) -> str | None:
        """The event whose id starts with `prefix` (the leading bytes of a booking id)."""
        return self._by_prefix.get(bytes(prefix[:ROUTING_PREFIX_BYTES]))

    def nearest_regions(self, origin: str) -> list[str]:
        """Every region, nearest to `origin` first (by `origin`'s latency figures)."""
        here = self.regions.get(origin)
        if here is None:
            return sorted(self.regions, key=lambda r: (r != origin, r))
        return here.nearest(self.regions)

    def region_index(self, name: str) -> int:
        return self.key_indexes.get(region_key(name), 0)

    def shard_index(self, name: str) -> int:
        return self.key_indexes.get(shard_key(name), 0)

    def placement_index(self, event_id: str) -> int:
        return self.key_indexes.get(placement_key(event_id), 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "regions": {n: r.to_json() for n, r in self.regions.items()},
            "shards": {n: s.to_json() for n, s in self.shards.items()},
            "placements": dict(self.placements),
            "placementLsns": dict(self.placement_lsns),
        }
