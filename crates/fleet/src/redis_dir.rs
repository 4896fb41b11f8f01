//! The fleet directory on Redis Cluster.
//!
//! Keys (every one carries the configured prefix; no operation touches two keys, so no
//! key needs a hash tag and locations spread over every master):
//! - `PREFIX:loc:USER` → location value (`NODE:EPOCH`), expiring after the location TTL;
//! - `PREFIX:members` → hash `ID → EXPIRES_MS RECORD` (see [`crate::codec`]). The expiry
//!   stamps come from the clock of the one master that holds the hash (read and written
//!   inside scripts), so supernode clock skew does not matter. Readers ignore expired
//!   records and now and then prune them.
//!
//! Batches (lookup_many, refresh) are split by the master that owns each key, following
//! a copy of the cluster's slot map, and sent as one pipeline per master (at most 1,000
//! commands each). A command that a master refuses (the slot moved, a script not loaded
//! yet) is retried on its own through the cluster client, which follows redirections; a
//! pipeline that fails outright (master unreachable, timeout) fails the batch. Either way
//! the slot map is re-read before the next batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Cmd, Script, Value};
use tokio::time::Instant;

use crate::codec::{decode_location, decode_stamped_member, encode_location, encode_member};
use crate::{
    DirectoryUrl, FleetConfig, FleetDirectory, FleetError, FleetLocation, Member, UrlError,
    Username,
};

const SLOTS: usize = 16384;
/// Commands per pipeline at most: a larger batch goes out as several pipelines, so
/// neither side buffers an unbounded reply.
const MAX_PIPELINE: usize = 1000;
/// Expired member records are pruned on one members read in this many.
const PRUNE_EVERY: u32 = 16;
/// The slot map is re-read at most this often after a redirection.
const SLOT_MAP_MIN_AGE: Duration = Duration::from_secs(1);
/// Connect and per-request timeouts: a dead master fails a call within seconds instead of
/// hanging it; the next call tries again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

// Compare-and-delete: drop the entry only if it is still the caller's location.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

// Renew our entry, re-create it if it vanished, leave a newer claim alone.
const REFRESH_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

// ARGV: id, member ttl ms, record, hash ttl ms. Stamps the record with this master's clock.
const ANNOUNCE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now + tonumber(ARGV[2])) .. ' ' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1";

// ARGV: '1' to prune expired or unreadable records. Returns {now_ms, HGETALL}.
const MEMBERS_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
if ARGV[1] == '1' then
  local kept = {}
  for i = 1, #all, 2 do
    local exp = tonumber(string.match(all[i + 1], '^(%d+) '))
    if exp == nil or exp <= now then
      redis.call('HDEL', KEYS[1], all[i])
    else
      kept[#kept + 1] = all[i]
      kept[#kept + 1] = all[i + 1]
    end
  end
  all = kept
end
return {string.format('%.0f', now), all}";

/// A [`FleetDirectory`] on Redis Cluster. Cheap to share behind an `Arc`; one multiplexed
/// connection per master serves every task.
pub struct RedisDirectory {
    conn: ClusterConnection,
    config: FleetConfig,
    members_key: String,
    release: Script,
    refresh: Script,
    announce: Script,
    members: Script,
    slots: Mutex<SlotMap>,
    live: Mutex<Option<(Instant, LiveMembers)>>,
    /// Held while one task re-reads the member list, so concurrent lookups that find the
    /// copy stale wait for that read instead of each reading the whole hash.
    live_reading: tokio::sync::Mutex<()>,
    member_reads: AtomicU32,
    retried: AtomicU64,
}

impl std::fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectory")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

/// How old the member list may be when a location names a supernode it does not know.
const REREAD_UNKNOWN: Duration = Duration::from_millis(100);

/// Live member ids and their epochs.
type LiveMembers = Arc<HashMap<u32, u64>>;

/// Which master owns each slot, as an index per slot (`u16::MAX`: not known).
struct SlotMap {
    owner: Vec<u16>,
    read_at: Option<Instant>,
    stale: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each guarded value is replaced whole, never left half-updated: poison is harmless.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisDirectory {
    /// Connects to the cluster named by `url` (`redis://h1:p1,h2:p2,...`) with the default
    /// [`FleetConfig`].
    pub async fn connect(url: &str) -> Result<Self, FleetError> {
        Self::connect_with(url, FleetConfig::default()).await
    }

    /// Connects with an explicit configuration.
    pub async fn connect_with(url: &str, config: FleetConfig) -> Result<Self, FleetError> {
        if config.prefix.contains(['{', '}']) {
            return Err(FleetError::BadPrefix(config.prefix));
        }
        let (nodes, username, password) = match DirectoryUrl::parse(url)? {
            DirectoryUrl::Redis {
                nodes,
                username,
                password,
            } => (nodes, username, password),
            DirectoryUrl::Memory => {
                return Err(UrlError {
                    shown: url.to_string(),
                    reason: "\"memory\" is not a Redis Cluster".to_string(),
                }
                .into())
            }
        };
        let seeds: Vec<String> = nodes
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("redis://[{h}]:{p}")
                } else {
                    format!("redis://{h}:{p}")
                }
            })
            .collect();
        let mut builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT);
        if let Some(u) = username {
            builder = builder.username(u);
        }
        if let Some(p) = password {
            builder = builder.password(p);
        }
        let client: ClusterClient = builder.build()?;
        let conn = client.get_async_connection().await?;
        let dir = Self {
            conn,
            members_key: format!("{}:members", config.prefix),
            config,
            release: Script::new(RELEASE_LUA),
            refresh: Script::new(REFRESH_LUA),
            announce: Script::new(ANNOUNCE_LUA),
            members: Script::new(MEMBERS_LUA),
            slots: Mutex::new(SlotMap {
                owner: vec![u16::MAX; SLOTS],
                read_at: None,
                stale: true,
            }),
            live: Mutex::new(None),
            live_reading: tokio::sync::Mutex::new(()),
            member_reads: AtomicU32::new(0),
            retried: AtomicU64::new(0),
        };
        dir.load_scripts().await?;
        dir.read_slot_map().await?;
        Ok(dir)
    }

    /// The configuration in use.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// How many batched commands so far had to be retried one by one (after a slot moved,
    /// a master failed or lost its scripts). Stays at zero on a stable cluster.
    pub fn batch_retries(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// How many times this handle has read the member list from Redis.
    pub fn member_reads(&self) -> u32 {
        self.member_reads.load(Ordering::Relaxed)
    }

    fn loc_key(&self, user: &Username) -> String {
        format!("{}:loc:{}", self.config.prefix, user.as_str())
    }

    fn conn(&self) -> ClusterConnection {
        // A clone shares the one multiplexed connection per master.
        self.conn.clone()
    }

    /// Loads the batch scripts on every master, so pipelined EVALSHA finds them.
    async fn load_scripts(&self) -> Result<(), FleetError> {
        let mut conn = self.conn();
        for code in [REFRESH_LUA, RELEASE_LUA] {
            let mut cmd = redis::cmd("SCRIPT");
            cmd.arg("LOAD").arg(code);
            conn.route_command(
                cmd,
                RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                )),
            )
            .await?;
        }
        Ok(())
    }

    /// Re-reads which master owns each slot (CLUSTER SLOTS).
    async fn read_slot_map(&self) -> Result<(), FleetError> {
        let mut conn = self.conn();
        let reply = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let owner = parse_cluster_slots(&reply).ok_or_else(|| FleetError::Protocol {
            op: "CLUSTER SLOTS",
            detail: "not a slot table".to_string(),
        })?;
        let mut map = lock(&self.slots);
        map.owner = owner;
        map.read_at = Some(Instant::now());
        map.stale = false;
        Ok(())
    }

    async fn maybe_reread_slot_map(&self) {
        let due = {
            let map = lock(&self.slots);
            map.stale && map.read_at.is_none_or(|t| t.elapsed() >= SLOT_MAP_MIN_AGE)
        };
        if due {
            // A failure leaves the old map: batches still work through the fallback.
            let _ = self.read_slot_map().await;
        }
    }

    /// Runs single-key commands as one pipeline per master; the answers come back in order.
    async fn batch(&self, cmds: Vec<(u16, Cmd)>) -> Result<Vec<Value>, FleetError> {
        self.maybe_reread_slot_map().await;
        let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
        {
            let map = lock(&self.slots);
            for (i, (slot, _)) in cmds.iter().enumerate() {
                let owner = map
                    .owner
                    .get(usize::from(*slot))
                    .copied()
                    .unwrap_or(u16::MAX);
                // Unknown owner: a group of its own slot, which the client routes itself.
                let group = if owner == u16::MAX {
                    u16::MAX - 1 - (*slot % 1024)
                } else {
                    owner
                };
                groups.entry(group).or_default().push(i);
            }
        }
        let chunks: Vec<&[usize]> = groups
            .values()
            .flat_map(|idx| idx.chunks(MAX_PIPELINE))
            .collect();
        let sends = chunks.into_iter().map(|idx| {
            let mut pipe = redis::pipe();
            for &i in idx {
                pipe.add_command(cmds[i].1.clone());
            }
            let slot = cmds[idx[0]].0;
            let mut conn = self.conn();
            async move {
                let n = idx.len();
                let r = conn
                    .route_pipeline(
                        pipe,
                        0,
                        n,
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
                    )
                    .await;
                (idx, r)
            }
        });
        let mut out = vec![Value::Nil; cmds.len()];
        let mut retry = Vec::new();
        for (idx, r) in join_all(sends).await {
            match r {
                Ok(values) if values.len() == idx.len() => {
                    for (&i, v) in idx.iter().zip(values) {
                        if matches!(v, Value::ServerError(_)) {
                            retry.push(i);
                        } else {
                            out[i] = v;
                        }
                    }
                }
                // A short reply is a protocol fault; retry those commands one by one.
                Ok(_) => retry.extend(idx.iter().copied()),
                // The master could not be reached or timed out: retrying each command
                // would only multiply the waiting. Fail the batch; the caller's next batch
                // is regrouped on a fresh slot map (the cluster client meanwhile follows
                // any failover).
                Err(e) => {
                    lock(&self.slots).stale = true;
                    return Err(e.into());
                }
            }
        }
        if !retry.is_empty() {
            self.retried
                .fetch_add(retry.len() as u64, Ordering::Relaxed);
            lock(&self.slots).stale = true;
            // A master that lost its scripts (restart, failover) answers NOSCRIPT.
            let _ = self.load_scripts().await;
            let singles = retry.iter().map(|&i| {
                let mut conn = self.conn();
                let cmd = cmds[i].1.clone();
                async move { (i, cmd.query_async::<Value>(&mut conn).await) }
            });
            for (i, r) in join_all(singles).await {
                out[i] = r?;
            }
        }
        Ok(out)
    }

    /// Live members (id → epoch), from a copy at most `member_cache` old.
    async fn live(&self) -> Result<LiveMembers, FleetError> {
        self.live_within(self.config.member_cache).await
    }

    /// Live members from a copy at most `age` old.
    async fn live_within(&self, age: Duration) -> Result<LiveMembers, FleetError> {
        if let Some(live) = self.cached_live(age) {
            return Ok(live);
        }
        let _reading = self.live_reading.lock().await;
        // Another task may have read it while this one waited.
        if let Some(live) = self.cached_live(age) {
            return Ok(live);
        }
        let members = self.read_members().await?;
        Ok(self.cache_members(&members))
    }

    /// Live members for resolving `values`: a location naming a supernode the cached copy
    /// does not know (in that epoch) may be a supernode that joined since the copy was
    /// read, so the list is then read again, at most every [`REREAD_UNKNOWN`].
    async fn live_for(&self, values: &[Value]) -> Result<LiveMembers, FleetError> {
        let live = self.live().await?;
        let unknown = values.iter().any(|v| {
            let Value::BulkString(b) = v else {
                return false;
            };
            decode_location(b).is_ok_and(|l| live.get(&l.node) != Some(&l.epoch))
        });
        if unknown {
            return self.live_within(REREAD_UNKNOWN).await;
        }
        Ok(live)
    }

    fn cached_live(&self, age: Duration) -> Option<LiveMembers> {
        lock(&self.live)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < age)
            .map(|(_, live)| Arc::clone(live))
    }

    fn cache_members(&self, members: &[Member]) -> LiveMembers {
        let live: LiveMembers = Arc::new(members.iter().map(|m| (m.id, m.epoch)).collect());
        *lock(&self.live) = Some((Instant::now(), Arc::clone(&live)));
        live
    }

    async fn read_members(&self) -> Result<Vec<Member>, FleetError> {
        let n = self.member_reads.fetch_add(1, Ordering::Relaxed);
        let prune = if n.is_multiple_of(PRUNE_EVERY) {
            "1"
        } else {
            "0"
        };
        let reply: Value = self
            .members
            .key(&self.members_key)
            .arg(prune)
            .invoke_async(&mut self.conn())
            .await?;
        let bad = |detail: &str| FleetError::Protocol {
            op: "members",
            detail: detail.to_string(),
        };
        let Value::Array(parts) = reply else {
            return Err(bad("not an array"));
        };
        let [now, Value::Array(all)] = parts.as_slice() else {
            return Err(bad("not [now, fields]"));
        };
        let now: u64 = match now {
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad server time"))?,
            _ => return Err(bad("bad server time")),
        };
        let mut out = Vec::new();
        for pair in all.chunks_exact(2) {
            // Records that do not decode (another version, damage) are skipped, not fatal.
            if let Value::BulkString(v) = &pair[1] {
                if let Ok((expires, m)) = decode_stamped_member(v) {
                    if expires > now {
                        out.push(m);
                    }
                }
            }
        }
        out.sort_by_key(|m| m.id);
        Ok(out)
    }

    fn resolve(live: &HashMap<u32, u64>, value: &Value) -> Option<FleetLocation> {
        let Value::BulkString(b) = value else {
            return None;
        };
        // An undecodable value is treated as absent: it cannot route anywhere.
        let loc = decode_location(b).ok()?;
        (live.get(&loc.node) == Some(&loc.epoch)).then_some(loc)
    }
}

/// Key slot as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of its hash tag
/// (the part between the first `{` and the next `}`, when non-empty), modulo 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let mut k = key;
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let after = &key[open + 1..];
        if let Some(close) = after.iter().position(|&b| b == b'}') {
            if close > 0 {
                k = &after[..close];
            }
        }
    }
    crc16_xmodem(k) % SLOTS as u16
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Turns a CLUSTER SLOTS reply into a per-slot master index; `None` if it is malformed.
pub(crate) fn parse_cluster_slots(reply: &Value) -> Option<Vec<u16>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut owner = vec![u16::MAX; SLOTS];
    let mut masters: Vec<Vec<u8>> = Vec::new();
    for range in ranges {
        let Value::Array(f) = range else { return None };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return None;
        };
        // Identify a master by host and port (its id is optional in old versions).
        let id = match (master.first(), master.get(1)) {
            (Some(Value::BulkString(h)), Some(Value::Int(p))) => {
                let mut id = h.clone();
                id.extend_from_slice(&p.to_be_bytes());
                id
            }
            _ => return None,
        };
        let index = match masters.iter().position(|m| *m == id) {
            Some(i) => i,
            None => {
                masters.push(id);
                masters.len() - 1
            }
        };
        let index = u16::try_from(index).ok().filter(|&i| i < u16::MAX - 1024)?;
        let start = usize::try_from(*start).ok()?;
        let end = usize::try_from(*end).ok()?;
        if start > end || end >= SLOTS {
            return None;
        }
        owner[start..=end].fill(index);
    }
    Some(owner)
}

#[async_trait]
impl FleetDirectory for RedisDirectory {
    async fn claim(
        &self,
        user: &Username,
        loc: FleetLocation,
    ) -> Result<Option<FleetLocation>, FleetError> {
        let prev: Option<Vec<u8>> = redis::cmd("SET")
            .arg(self.loc_key(user))
            .arg(encode_location(loc))
            .arg("PX")
            .arg(millis(self.config.location_ttl))
            .arg("GET")
            .query_async(&mut self.conn())
            .await?;
        // A damaged previous value names no session to drop.
        Ok(prev.and_then(|b| decode_location(&b).ok()))
    }

    async fn release(&self, user: &Username, loc: FleetLocation) -> Result<bool, FleetError> {
        let n: i64 = self
            .release
            .key(self.loc_key(user))
            .arg(encode_location(loc))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    async fn lookup(&self, user: &Username) -> Result<Option<FleetLocation>, FleetError> {
        let value: Value = redis::cmd("GET")
            .arg(self.loc_key(user))
            .query_async(&mut self.conn())
            .await?;
        if matches!(value, Value::Nil) {
            return Ok(None);
        }
        let live = self.live_for(std::slice::from_ref(&value)).await?;
        Ok(Self::resolve(&live, &value))
    }

    async fn lookup_many(
        &self,
        users: &[Username],
    ) -> Result<Vec<Option<FleetLocation>>, FleetError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = users
            .iter()
            .map(|u| {
                let key = self.loc_key(u);
                (key_slot(key.as_bytes()), redis::cmd("GET").arg(key).clone())
            })
            .collect();
        let values = self.batch(cmds).await?;
        let live = self.live_for(&values).await?;
        Ok(values.iter().map(|v| Self::resolve(&live, v)).collect())
    }

    async fn refresh(
        &self,
        entries: &[(Username, FleetLocation)],
    ) -> Result<Vec<bool>, FleetError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = millis(self.config.location_ttl);
        let hash = self.refresh.get_hash();
        let cmds = entries
            .iter()
            .map(|(u, loc)| {
                let key = self.loc_key(u);
                let slot = key_slot(key.as_bytes());
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(hash)
                    .arg(1)
                    .arg(key)
                    .arg(encode_location(*loc))
                    .arg(ttl);
                (slot, cmd)
            })
            .collect();
        let values = self.batch(cmds).await?;
        values
            .into_iter()
            .map(|v| match v {
                Value::Int(n) => Ok(n == 1),
                other => Err(FleetError::Protocol {
                    op: "refresh",
                    detail: format!("expected an integer, got {other:?}"),
                }),
            })
            .collect()
    }

    async fn announce(&self, member: &Member) -> Result<(), FleetError> {
        let ttl = millis(self.config.member_ttl);
        // The hash outlives its records by far; it vanishes only if the whole fleet stops.
        let hash_ttl = ttl.saturating_mul(720).max(3_600_000);
        let _: i64 = self
            .announce
            .key(&self.members_key)
            .arg(member.id)
            .arg(ttl)
            .arg(encode_member(member))
            .arg(hash_ttl)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn withdraw(&self, id: u32) -> Result<(), FleetError> {
        let _: i64 = redis::cmd("HDEL")
            .arg(&self.members_key)
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        // Our own lookups stop resolving its users at once.
        *lock(&self.live) = None;
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>, FleetError> {
        let members = self.read_members().await?;
        self.cache_members(&members);
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
    }

    fn slots_reply(ranges: &[(i64, i64, &str, i64)]) -> Value {
        Value::Array(
            ranges
                .iter()
                .map(|(s, e, h, p)| {
                    Value::Array(vec![
                        Value::Int(*s),
                        Value::Int(*e),
                        Value::Array(vec![
                            Value::BulkString(h.as_bytes().to_vec()),
                            Value::Int(*p),
                        ]),
                    ])
                })
                .collect(),
        )
    }

    #[test]
    fn cluster_slots_map_each_slot_to_its_master() {
        let reply = slots_reply(&[
            (0, 5460, "127.0.0.1", 57001),
            (5461, 10922, "127.0.0.1", 57002),
            (10923, 16383, "127.0.0.1", 57003),
            (100, 100, "127.0.0.1", 57003),
        ]);
        let owner = parse_cluster_slots(&reply).expect("valid reply");
        assert_eq!(owner[0], 0);
        assert_eq!(owner[100], 2);
        assert_eq!(owner[5461], 1);
        assert_eq!(owner[16383], 2);
    }

    #[test]
    fn malformed_cluster_slots_are_rejected() {
        assert!(parse_cluster_slots(&Value::Nil).is_none());
        assert!(parse_cluster_slots(&slots_reply(&[(5, 4, "h", 1)])).is_none());
        assert!(parse_cluster_slots(&slots_reply(&[(0, 16384, "h", 1)])).is_none());
        assert!(parse_cluster_slots(&slots_reply(&[(-1, 3, "h", 1)])).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_cluster_slot_tables_never_panic(
            ranges in proptest::collection::vec((any::<i64>(), any::<i64>(), "[a-z]{0,3}", any::<i64>()), 0..20)
        ) {
            let r: Vec<(i64, i64, &str, i64)> =
                ranges.iter().map(|(s, e, h, p)| (*s, *e, h.as_str(), *p)).collect();
            let _ = parse_cluster_slots(&slots_reply(&r));
        }

        #[test]
        fn slot_is_always_in_range(key in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert!(usize::from(key_slot(&key)) < SLOTS);
        }
    }
}
