//! Simulated users: their device keys and certificates, issued in bulk with the operator's
//! authority key, and the matching accounts in the supernode's store.
//!
//! This is an explicit test mode: it needs `authority.key` from the supernode's data dir,
//! which only the operator has. Users are named `ld0000000`, `ld0000001`, ...; users `2k`
//! and `2k+1` are mutually accepted contacts, so presence fan-out and connection setup
//! have a partner. Keys are derived from a seed and the user number, so the same data dir
//! always gets the same users.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use peerline_core::store::{Account, Device};
use peerline_crypto::cert::CertRequest;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_net::bootstrap::Bootstrap;
use peerline_wire::cert::CertRepr;
use peerline_wire::Username;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Files the load generator reads from a supernode data dir (names as `peerlined` writes
/// them).
pub const BOOTSTRAP_FILE: &str = "bootstrap";
/// The supernode's pid file.
pub const PID_FILE: &str = "peerlined.pid";
/// The authority's signing key (base64).
pub const AUTHORITY_KEY_FILE: &str = "authority.key";
/// The supernode's SQLite store.
pub const STORE_FILE: &str = "store.sqlite";
/// Where provisioned users are kept, inside the data dir.
pub const USERS_FILE: &str = "load-users.bin";

/// Longest certificate (username of 32 characters).
const MAX_CERT: usize = peerline_wire::msg::MAX_CERT;
/// Bytes per user in the users file and in memory: Noise key, cert length, cert.
const STRIDE: usize = 32 + 1 + MAX_CERT;
const MAGIC: &[u8; 8] = b"PLLOAD01";
/// Serials of load-test certificates live far above the store's own counter.
const SERIAL_BASE: u64 = 1 << 62;
/// Certificates issued for load tests are valid this long.
pub const CERT_LIFETIME_S: u64 = 7 * 24 * 3600;

/// Why users could not be provisioned or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsersError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file has unexpected contents.
    #[error("{}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Fewer users were provisioned than asked for.
    #[error("{have} users provisioned in {}, {want} wanted: run `peerline-load provision --data {} --users {want}` with the supernode stopped", dir.display(), dir.display())]
    TooFew {
        /// The data dir.
        dir: PathBuf,
        /// Provisioned.
        have: usize,
        /// Wanted.
        want: usize,
    },
    /// The store refused the import.
    #[error("store: {0}")]
    Store(String),
    /// The supernode is running.
    #[error(
        "the supernode (pid {0}) is running: stop it before provisioning, which writes its store"
    )]
    Running(u32),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UsersError + '_ {
    move |source| UsersError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the load generator needs from a supernode data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    /// The data dir.
    pub dir: PathBuf,
    /// Its bootstrap entry.
    pub bootstrap: Bootstrap,
}

impl DataDir {
    /// Reads the bootstrap entry of `dir`.
    pub fn open(dir: &Path) -> Result<DataDir, UsersError> {
        let path = dir.join(BOOTSTRAP_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let bootstrap = Bootstrap::parse(&text).map_err(|e| UsersError::Corrupt {
            path: path.clone(),
            what: e.to_string(),
        })?;
        Ok(DataDir {
            dir: dir.to_path_buf(),
            bootstrap,
        })
    }

    /// The running supernode's pid, if its pid file names a live process.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join(PID_FILE)).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// The authority's signing key (operator only).
    pub fn authority(&self) -> Result<Authority, UsersError> {
        let path = self.dir.join(AUTHORITY_KEY_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let raw: [u8; 32] = STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| UsersError::Corrupt {
                path: path.clone(),
                what: "not a base64 32-byte key".into(),
            })?;
        Ok(Authority::from_bytes(&raw))
    }
}

/// Name of user `i`.
pub fn username(i: usize) -> Username {
    // "ld" and at least 7 digits: always 3-32 characters of the allowed set.
    #[allow(clippy::expect_used)]
    Username::parse(&format!("ld{i:07}")).expect("a valid username by construction")
}

/// The contact partner of user `i` (users `2k` and `2k+1` are paired), if it exists.
pub fn partner(i: usize, n: usize) -> Option<usize> {
    let p = i ^ 1;
    (p < n).then_some(p)
}

fn keys(seed: u64, i: usize) -> DeviceKeys {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    DeviceKeys::generate(&mut ChaCha20Rng::from_seed(s))
}

/// Device keys and certificates of `n` users, `STRIDE` bytes each.
#[derive(Clone)]
pub struct Users {
    data: Vec<u8>,
    n: usize,
    authority: [u8; 32],
    not_after: u64,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Users(n={})", self.n)
    }
}

impl Users {
    /// Issues keys and certificates for `n` users with `threads` threads.
    pub fn issue(authority: &Authority, n: usize, seed: u64, now: u64, threads: usize) -> Users {
        let mut data = vec![0u8; n * STRIDE];
        let threads = threads.max(1);
        let per = n.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (t, chunk) in data.chunks_mut(per * STRIDE).enumerate() {
                scope.spawn(move || {
                    for (j, rec) in chunk.chunks_mut(STRIDE).enumerate() {
                        let i = t * per + j;
                        let k = keys(seed, i);
                        let req = CertRequest {
                            username: username(i),
                            device_id: device_id(seed, i),
                            noise_key: k.noise_public(),
                            sign_key: k.sign_public(),
                        };
                        let cert =
                            authority.issue(&req, SERIAL_BASE + i as u64, now, CERT_LIFETIME_S);
                        let c = cert.to_bytes();
                        rec[..32].copy_from_slice(&k.noise_private());
                        rec[32] = c.len() as u8;
                        rec[33..33 + c.len()].copy_from_slice(&c);
                    }
                });
            }
        });
        Users {
            data,
            n,
            authority: authority.public(),
            not_after: now + CERT_LIFETIME_S,
        }
    }

    /// Users held.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The authority that signed the certificates.
    pub fn authority(&self) -> [u8; 32] {
        self.authority
    }

    /// User `i`'s Noise private key.
    pub fn noise_private(&self, i: usize) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(&self.data[i * STRIDE..i * STRIDE + 32]);
        k
    }

    /// User `i`'s certificate.
    pub fn cert(&self, i: usize) -> &[u8] {
        let rec = &self.data[i * STRIDE..(i + 1) * STRIDE];
        let len = (rec[32] as usize).min(MAX_CERT);
        &rec[33..33 + len]
    }

    /// Keeps only the first `n` users.
    pub fn truncate(&mut self, n: usize) {
        if n < self.n {
            self.n = n;
            self.data.truncate(n * STRIDE);
        }
    }

    /// Writes the users file.
    pub fn save(&self, path: &Path) -> Result<(), UsersError> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut head = Vec::with_capacity(56);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(self.n as u64).to_le_bytes());
        head.extend_from_slice(&self.authority);
        head.extend_from_slice(&self.not_after.to_le_bytes());
        f.write_all(&head).map_err(io(&tmp))?;
        f.write_all(&self.data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// Reads a users file.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let corrupt = |what: &str| UsersError::Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
        };
        let mut f = std::fs::File::open(path).map_err(io(path))?;
        let mut head = [0u8; 56];
        f.read_exact(&mut head).map_err(io(path))?;
        if &head[..8] != MAGIC {
            return Err(corrupt("not a peerline-load users file"));
        }
        let n = u64::from_le_bytes(head[8..16].try_into().map_err(|_| corrupt("header"))?);
        let n = usize::try_from(n).map_err(|_| corrupt("user count"))?;
        let mut authority = [0u8; 32];
        authority.copy_from_slice(&head[16..48]);
        let not_after = u64::from_le_bytes(head[48..56].try_into().map_err(|_| corrupt("header"))?);
        let len = n.checked_mul(STRIDE).ok_or_else(|| corrupt("user count"))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data).map_err(io(path))?;
        if data.len() != len {
            return Err(corrupt("length does not match the user count"));
        }
        Ok(Users {
            data,
            n,
            authority,
            not_after,
        })
    }

    /// Certificates' expiry (unix seconds).
    pub fn not_after(&self) -> u64 {
        self.not_after
    }
}

fn device_id(seed: u64, i: usize) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&seed.to_le_bytes());
    d[8..].copy_from_slice(&(i as u64).to_le_bytes());
    d
}

/// What `provision` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProvisionReport {
    /// Users provisioned.
    pub users: usize,
    /// Contact pairs written.
    pub contact_pairs: usize,
    /// Seconds spent issuing keys and certificates.
    pub issue_s: f64,
    /// Seconds spent writing the store.
    pub store_s: f64,
}

/// Issues `n` users with the data dir's authority key, writes their accounts, devices and
/// contact pairs into the supernode's store (which must not be running), and saves the
/// users file beside it.
pub fn provision(dd: &DataDir, n: usize, threads: usize) -> Result<ProvisionReport, UsersError> {
    if let Some(pid) = dd.pid() {
        return Err(UsersError::Running(pid));
    }
    let authority = dd.authority()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let seed = u64::from_le_bytes(authority.public()[..8].try_into().unwrap_or([0; 8]));
    let t0 = std::time::Instant::now();
    let users = Users::issue(&authority, n, seed, now, threads);
    let issue_s = t0.elapsed().as_secs_f64();

    // An unusable password: a real Argon2id hash of a random secret that is thrown away, so
    // these accounts can log in only with their certificates.
    let password_hash = unusable_password_hash();
    let t1 = std::time::Instant::now();
    let path = dd.dir.join(STORE_FILE);
    let mut store =
        peerline_store::SqliteStore::open(&path).map_err(|e| UsersError::Store(e.to_string()))?;
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        // The public keys come back out of the certificate: no second key derivation.
        let repr = CertRepr::decode(users.cert(i)).map_err(|e| UsersError::Store(e.to_string()))?;
        rows.push((
            Account {
                username: repr.username.clone(),
                password_hash: password_hash.clone(),
                created_at: now,
            },
            Device {
                username: repr.username,
                device_id: repr.device_id,
                noise_key: repr.noise_key,
                sign_key: repr.sign_key,
                revoked: false,
            },
        ));
    }
    let pairs: Vec<(Username, Username)> = (0..n / 2)
        .map(|k| (username(2 * k), username(2 * k + 1)))
        .collect();
    store.bulk_import(&rows, &pairs).map_err(|e| {
        UsersError::Store(format!(
            "{e} (provision a fresh data dir, or one provisioned with fewer users is not extended)"
        ))
    })?;
    let store_s = t1.elapsed().as_secs_f64();
    users.save(&dd.dir.join(USERS_FILE))?;
    Ok(ProvisionReport {
        users: n,
        contact_pairs: pairs.len(),
        issue_s,
        store_s,
    })
}

fn unusable_password_hash() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut secret = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
    let salt = SaltString::generate(&mut rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(&secret, &salt)
        .map(|h| h.to_string())
        .unwrap_or_else(|_| "!".into())
}

/// Loads the first `n` provisioned users of a data dir.
pub fn load_users(dd: &DataDir, n: usize) -> Result<Users, UsersError> {
    let path = dd.dir.join(USERS_FILE);
    if !path.exists() {
        return Err(UsersError::TooFew {
            dir: dd.dir.clone(),
            have: 0,
            want: n,
        });
    }
    let mut users = Users::load(&path)?;
    if users.authority() != dd.bootstrap.authority {
        return Err(UsersError::Corrupt {
            path,
            what: "issued by another authority than the bootstrap entry's: provision again".into(),
        });
    }
    if users.len() < n {
        return Err(UsersError::TooFew {
            dir: dd.dir.clone(),
            have: users.len(),
            want: n,
        });
    }
    users.truncate(n);
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerline_crypto::Certificate;

    #[test]
    fn issued_users_verify_and_survive_a_save_and_load() {
        let auth = Authority::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let users = Users::issue(&auth, 5, 9, 1_000_000, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.bin");
        users.save(&path).unwrap();
        let back = Users::load(&path).unwrap();
        assert_eq!(back.len(), 5);
        for i in 0..5 {
            let c = Certificate::verify(back.cert(i), &auth.public()).unwrap();
            assert_eq!(c.username(), &username(i));
            let k = DeviceKeys::from_bytes(&{
                let mut b = [0u8; 64];
                b[..32].copy_from_slice(&back.noise_private(i));
                b
            });
            assert!(c.check_for(&k.noise_public(), 1_000_000).is_ok());
        }
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Users::load(&path).is_err());
    }

    #[test]
    fn partners_are_pairs_within_range() {
        assert_eq!(partner(0, 4), Some(1));
        assert_eq!(partner(3, 4), Some(2));
        assert_eq!(partner(4, 5), None);
    }
}
