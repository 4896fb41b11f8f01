//! Noise `IK` handshakes and stateless transport for datagrams.
//!
//! Pattern `Noise_IK_25519_ChaChaPoly_BLAKE2s` with the prologue [`PROLOGUE`]. The initiator
//! knows the responder's static key beforehand (a supernode's from the bootstrap entry, a
//! peer's from its certificate). After the handshake each datagram carries its own 64-bit
//! nonce, so loss and reordering are harmless; a [`ReplayWindow`] drops duplicates.
//!
//! Randomness (ephemeral keys) comes from a caller-provided seed, so handshakes are
//! reproducible in simulations.
//!
//! snow runs the handshake; the transport phase is done here on the two raw keys of the
//! split (snow's `risky-raw-split`), with ring's ChaCha20-Poly1305 keyed per packet. The
//! bytes are exactly Noise's (nonce: four zero bytes then the counter little-endian, no
//! associated data), but a session costs 64 bytes of keys instead of snow's two boxed ring
//! keys (about 1 KB), which is most of a supernode's memory per online user.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use snow::params::NoiseParams;
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::HandshakeState;

use crate::replay::ReplayWindow;
use zeroize::Zeroize;

/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue mixed into every handshake: binds the application and wire version.
pub const PROLOGUE: &[u8] = b"peerline/1";
/// After this many messages a session must be replaced by a new handshake.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Largest Noise message (payload plus tag).
pub const MAX_MESSAGE: usize = 65_535;

/// A handshake or transport failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// Decryption or authentication failed (forged, corrupted, or wrong key).
    #[error("decryption failed")]
    Decrypt,
    /// The message is malformed or of the wrong size.
    #[error("malformed handshake or transport message")]
    Malformed,
    /// Replayed or too old a counter.
    #[error("replayed counter {0}")]
    Replay(u64),
    /// The session has sent too many messages: rekey.
    #[error("session exhausted")]
    Exhausted,
}

impl From<snow::Error> for NoiseError {
    fn from(e: snow::Error) -> Self {
        match e {
            snow::Error::Decrypt => NoiseError::Decrypt,
            _ => NoiseError::Malformed,
        }
    }
}

struct SeededRng(rand_chacha::ChaCha20Rng);

impl snow::types::Random for SeededRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

struct SeededResolver([u8; 32]);

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(SeededRng(rand_chacha::ChaCha20Rng::from_seed(
            self.0,
        ))))
    }
    fn resolve_dh(&self, _: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        None
    }
    fn resolve_hash(&self, _: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        None
    }
    fn resolve_cipher(
        &self,
        _: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        None
    }
}

fn builder<'a>(seed: [u8; 32]) -> snow::Builder<'a> {
    // The pattern string is a constant known to parse.
    #[allow(clippy::expect_used)]
    let params: NoiseParams = NOISE_PATTERN.parse().expect("valid noise pattern");
    // Seeded RNG first; ring for ChaChaPoly (fast); the default resolver for 25519 and BLAKE2s.
    let resolver = FallbackResolver::new(
        Box::new(SeededResolver(seed)),
        Box::new(FallbackResolver::new(
            Box::new(RingResolver),
            Box::new(DefaultResolver),
        )),
    );
    snow::Builder::with_resolver(params, Box::new(resolver))
}

/// An initiator's handshake in flight.
pub struct Handshake {
    hs: HandshakeState,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handshake")
    }
}

impl Handshake {
    /// Starts a handshake to `remote_static`; returns the state and Noise message 1,
    /// which carries `payload` encrypted.
    pub fn initiate(
        local_private: &[u8; 32],
        remote_static: &[u8; 32],
        seed: [u8; 32],
        payload: &[u8],
    ) -> Result<(Handshake, Vec<u8>), NoiseError> {
        let mut hs = builder(seed)
            .local_private_key(local_private)?
            .remote_public_key(remote_static)?
            .prologue(PROLOGUE)?
            .build_initiator()?;
        let mut out = vec![0u8; 96 + payload.len() + 16];
        let n = hs.write_message(payload, &mut out)?;
        out.truncate(n);
        Ok((Handshake { hs }, out))
    }

    /// Reads Noise message 2 and returns the transport and the responder's payload.
    pub fn finish(mut self, msg2: &[u8]) -> Result<(Transport, Vec<u8>), NoiseError> {
        let mut payload = vec![0u8; msg2.len()];
        let n = self.hs.read_message(msg2, &mut payload)?;
        payload.truncate(n);
        let remote = remote_key(&self.hs)?;
        let (send, recv) = split(&mut self.hs)?;
        Ok((
            Transport::new(send, recv, remote, ReplayWindow::new()),
            payload,
        ))
    }
}

/// The transport keys (ours to send, ours to receive) of a finished handshake.
fn split(hs: &mut HandshakeState) -> Result<([u8; 32], [u8; 32]), NoiseError> {
    if !hs.is_handshake_finished() {
        return Err(NoiseError::Malformed);
    }
    let (initiator_sends, responder_sends) = hs.dangerously_get_raw_split();
    Ok(if hs.is_initiator() {
        (initiator_sends, responder_sends)
    } else {
        (responder_sends, initiator_sends)
    })
}

fn remote_key(hs: &HandshakeState) -> Result<[u8; 32], NoiseError> {
    let r = hs.get_remote_static().ok_or(NoiseError::Malformed)?;
    let mut k = [0u8; 32];
    if r.len() != 32 {
        return Err(NoiseError::Malformed);
    }
    k.copy_from_slice(r);
    Ok(k)
}

/// A responder that has read message 1 and knows who is calling.
pub struct Responder {
    hs: HandshakeState,
    /// The initiator's static key, authenticated by the handshake.
    pub remote_static: [u8; 32],
    /// The initiator's decrypted payload.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responder")
    }
}

impl Responder {
    /// Reads Noise message 1 (costs two Diffie-Hellman operations).
    pub fn read(
        local_private: &[u8; 32],
        seed: [u8; 32],
        msg1: &[u8],
    ) -> Result<Responder, NoiseError> {
        let mut hs = builder(seed)
            .local_private_key(local_private)?
            .prologue(PROLOGUE)?
            .build_responder()?;
        let mut payload = vec![0u8; msg1.len()];
        let n = hs.read_message(msg1, &mut payload)?;
        payload.truncate(n);
        let remote_static = remote_key(&hs)?;
        Ok(Responder {
            hs,
            remote_static,
            payload,
        })
    }

    /// Writes Noise message 2 carrying `payload` and returns the transport, with a replay
    /// window for media ([`ReplayWindow::new`]).
    pub fn accept(self, payload: &[u8]) -> Result<(Transport, Vec<u8>), NoiseError> {
        self.accept_with(payload, ReplayWindow::new())
    }

    /// As [`Responder::accept`], with the given replay window (a supernode's sessions,
    /// which carry no media, take [`ReplayWindow::small`]).
    pub fn accept_with(
        mut self,
        payload: &[u8],
        replay: ReplayWindow,
    ) -> Result<(Transport, Vec<u8>), NoiseError> {
        let mut out = vec![0u8; 48 + payload.len()];
        let n = self.hs.write_message(payload, &mut out)?;
        out.truncate(n);
        let (send, recv) = split(&mut self.hs)?;
        Ok((Transport::new(send, recv, self.remote_static, replay), out))
    }
}

/// An established session's keys, send counter and replay window.
pub struct Transport {
    send_key: [u8; 32],
    recv_key: [u8; 32],
    next_send: u64,
    replay: ReplayWindow,
    remote_static: [u8; 32],
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transport(sent={})", self.next_send)
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        // Best effort: the keys do not outlive the session in this struct's memory.
        self.send_key.zeroize();
        self.recv_key.zeroize();
    }
}

/// ring's key for one operation: building it copies the 32 bytes (ChaCha20 has no key
/// schedule), far cheaper than the seal or open it serves.
fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always valid for ChaCha20-Poly1305.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte key"))
}

/// Noise's ChaChaPoly nonce: 32 bits of zeros, then the counter little-endian.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Transport {
    fn new(
        send_key: [u8; 32],
        recv_key: [u8; 32],
        remote_static: [u8; 32],
        replay: ReplayWindow,
    ) -> Self {
        Transport {
            send_key,
            recv_key,
            next_send: 0,
            replay,
            remote_static,
        }
    }

    /// The peer's authenticated static key.
    pub fn remote_static(&self) -> &[u8; 32] {
        &self.remote_static
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.next_send
    }

    /// Encrypts `plaintext`, appending ciphertext and tag to `out`; returns the counter
    /// (nonce) to put in the packet header.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<u64, NoiseError> {
        if self.next_send >= REJECT_AFTER_MESSAGES {
            return Err(NoiseError::Exhausted);
        }
        if plaintext.len() + TAG_LEN > MAX_MESSAGE {
            return Err(NoiseError::Malformed);
        }
        let c = self.next_send;
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = aead_key(&self.send_key)
            .seal_in_place_separate_tag(nonce(c), Aad::empty(), &mut out[start..])
            .map_err(|_| NoiseError::Malformed)?;
        out.extend_from_slice(tag.as_ref());
        self.next_send += 1;
        Ok(c)
    }

    /// Authenticates and decrypts a packet, rejecting replays. The replay check runs first
    /// (cheap), the window is updated only after the tag verified.
    pub fn open(&mut self, counter: u64, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if ciphertext.len() < TAG_LEN || ciphertext.len() > MAX_MESSAGE {
            return Err(NoiseError::Malformed);
        }
        if !self.replay.check(counter) {
            return Err(NoiseError::Replay(counter));
        }
        let mut buf = ciphertext.to_vec();
        let n = aead_key(&self.recv_key)
            .open_in_place(nonce(counter), Aad::empty(), &mut buf)
            .map_err(|_| NoiseError::Decrypt)?
            .len();
        buf.truncate(n);
        if !self.replay.accept(counter) {
            return Err(NoiseError::Replay(counter));
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceKeys;

    fn keys(seed: u64) -> DeviceKeys {
        DeviceKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
    }

    fn pair() -> (Transport, Transport) {
        let (a, b) = (keys(1), keys(2));
        let (hs, m1) =
            Handshake::initiate(&a.noise_private(), &b.noise_public(), [1; 32], b"hello").unwrap();
        let r = Responder::read(&b.noise_private(), [2; 32], &m1).unwrap();
        assert_eq!(r.payload, b"hello");
        assert_eq!(r.remote_static, a.noise_public());
        let (tb, m2) = r.accept(b"welcome").unwrap();
        let (ta, p) = hs.finish(&m2).unwrap();
        assert_eq!(p, b"welcome");
        assert_eq!(ta.remote_static(), &b.noise_public());
        (ta, tb)
    }

    #[test]
    fn handshake_then_transport_both_ways_with_reordering() {
        let (mut a, mut b) = pair();
        let mut c1 = Vec::new();
        let n1 = a.seal(b"one", &mut c1).unwrap();
        let mut c2 = Vec::new();
        let n2 = a.seal(b"two", &mut c2).unwrap();
        assert_eq!(b.open(n2, &c2).unwrap(), b"two");
        assert_eq!(b.open(n1, &c1).unwrap(), b"one");
        assert_eq!(b.open(n1, &c1), Err(NoiseError::Replay(n1)));
        let mut c3 = Vec::new();
        let n3 = b.seal(b"back", &mut c3).unwrap();
        assert_eq!(a.open(n3, &c3).unwrap(), b"back");
    }

    #[test]
    fn forged_packet_does_not_burn_the_counter() {
        let (mut a, mut b) = pair();
        let mut c = Vec::new();
        let n = a.seal(b"real", &mut c).unwrap();
        let mut forged = c.clone();
        forged[0] ^= 1;
        assert_eq!(b.open(n, &forged), Err(NoiseError::Decrypt));
        assert_eq!(b.open(n, &c).unwrap(), b"real");
    }

    /// The hand-written transport speaks Noise's transport messages: what snow's own
    /// stateless transport seals opens here, and the other way round.
    #[test]
    fn transport_is_byte_compatible_with_snow() {
        let (a, b) = (keys(1), keys(2));
        let (hs, m1) =
            Handshake::initiate(&a.noise_private(), &b.noise_public(), [1; 32], b"hi").unwrap();
        let mut r = builder([2; 32])
            .local_private_key(&b.noise_private())
            .unwrap()
            .prologue(PROLOGUE)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut buf = vec![0u8; 1024];
        r.read_message(&m1, &mut buf).unwrap();
        let n = r.write_message(b"ok", &mut buf).unwrap();
        let (mut ours, _) = hs.finish(&buf[..n]).unwrap();
        let snow_side = r.into_stateless_transport_mode().unwrap();
        for len in [0usize, 1, 63, 64, 1200] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut sealed = Vec::new();
            let c = ours.seal(&msg, &mut sealed).unwrap();
            let mut out = vec![0u8; sealed.len()];
            let m = snow_side.read_message(c, &sealed, &mut out).unwrap();
            assert_eq!(&out[..m], &msg[..]);
            let mut theirs = vec![0u8; len + TAG_LEN];
            let k = snow_side.write_message(100 + c, &msg, &mut theirs).unwrap();
            assert_eq!(ours.open(100 + c, &theirs[..k]).unwrap(), msg);
        }
    }

    #[test]
    fn oversized_and_truncated_messages_are_refused() {
        let (mut a, mut b) = pair();
        let mut out = Vec::new();
        assert_eq!(
            a.seal(&vec![0; MAX_MESSAGE], &mut out),
            Err(NoiseError::Malformed)
        );
        assert_eq!(b.open(0, &[0; TAG_LEN - 1]), Err(NoiseError::Malformed));
        assert_eq!(
            b.open(0, &vec![0; MAX_MESSAGE + 1]),
            Err(NoiseError::Malformed)
        );
    }

    #[test]
    fn compact_window_session_works_and_rejects_old_counters() {
        let (a, b) = (keys(1), keys(2));
        let (hs, m1) =
            Handshake::initiate(&a.noise_private(), &b.noise_public(), [1; 32], b"").unwrap();
        let r = Responder::read(&b.noise_private(), [2; 32], &m1).unwrap();
        let (mut tb, m2) = r.accept_with(b"", ReplayWindow::small()).unwrap();
        let (mut ta, _) = hs.finish(&m2).unwrap();
        let mut first = Vec::new();
        let c0 = ta.seal(b"first", &mut first).unwrap();
        for _ in 0..crate::replay::SMALL_WINDOW {
            let mut p = Vec::new();
            let c = ta.seal(b"x", &mut p).unwrap();
            assert_eq!(tb.open(c, &p).unwrap(), b"x");
        }
        assert_eq!(tb.open(c0, &first), Err(NoiseError::Replay(c0)));
    }

    #[test]
    fn wrong_responder_key_fails() {
        let (a, b, c) = (keys(1), keys(2), keys(3));
        let (_hs, m1) =
            Handshake::initiate(&a.noise_private(), &b.noise_public(), [1; 32], b"").unwrap();
        assert!(Responder::read(&c.noise_private(), [2; 32], &m1).is_err());
    }

    #[test]
    fn same_seed_same_bytes() {
        let (a, b) = (keys(1), keys(2));
        let (_, m1) =
            Handshake::initiate(&a.noise_private(), &b.noise_public(), [5; 32], b"x").unwrap();
        let (_, m2) =
            Handshake::initiate(&a.noise_private(), &b.noise_public(), [5; 32], b"x").unwrap();
        assert_eq!(m1, m2);
    }
}
