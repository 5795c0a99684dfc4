//! Sealed VXLAN: the datagrams of an encrypted network, as pure functions over buffers.
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|R|R|R|0|R|S|R|    Key id     |           Reserved            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       Counter (64 bits)                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   ChaCha20-Poly1305 ciphertext of the inner Ethernet frame    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     Tag (128 bits)                            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! The first 8 bytes are shaped like a VXLAN header (RFC 7348 §5) with the I flag clear and
//! the S flag (0x02) set: a VXLAN device that does not know the format drops it (the I flag
//! is mandatory), and overlayd tells sealed from plain by one bit. The whole 16-byte header
//! is the AEAD's associated data, so VNI, key id and counter cannot be changed; the nonce is
//! four zero bytes and the counter.
//!
//! A key seals one direction between two nodes on one network in one key epoch (the daemon
//! derives it, see the README), so a counter is unique per key as long as its sender never
//! repeats one. A [`Sealer`] starts its counter at the wall-clock time in nanoseconds and
//! counts up, so a restarted sender continues above what it sent before (it would need to
//! send more than one datagram per nanosecond to catch up with the clock), and the receiver's
//! [`Window`] takes it.
//!
//! [`Opener::open`] checks the window before the tag (a cheap refusal of old counters) and
//! records the counter only after the tag verified, so forged datagrams cannot move it.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};

use crate::vxlan::{self, Vni};

/// Byte offsets of the sealed header.
mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const KEY_ID: usize = 1;
    pub const VNI: Range<usize> = 4..7;
    pub const COUNTER: Range<usize> = 8..16;
}

/// Length of the sealed header, before the ciphertext.
pub const HEADER_LEN: usize = field::COUNTER.end;
/// Length of the Poly1305 tag, after the ciphertext.
pub const TAG_LEN: usize = 16;
/// What a sealed datagram costs on top of a plain VXLAN one of the same frame (24 bytes).
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN - vxlan::HEADER_LEN;
/// The S flag: "sealed".
pub const FLAG_SEALED: u8 = 0x02;
/// Counters the [`Window`] remembers below the highest one seen (as WireGuard: 2048 less a
/// word, enough for the reordering of a few `UDP_GRO` batches across workers).
pub const WINDOW: u64 = 2048 - 64;

/// Whether `datagram` claims to be sealed: the S flag set and the I flag clear (with the I
/// flag, S is a reserved bit of a plain VXLAN header). Says nothing about whether it is.
pub fn is_sealed(datagram: &[u8]) -> bool {
    datagram
        .get(field::FLAGS)
        .is_some_and(|f| f & (FLAG_SEALED | vxlan::FLAG_I) == FLAG_SEALED)
}

/// The 256-bit key of one direction of one node pair on one network in one epoch.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a sealed datagram was refused. Nothing was recorded in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Shorter than a header and a tag, or the S flag is clear.
    #[error("not a sealed datagram")]
    Malformed,
    /// The counter was seen already, or is older than the window.
    #[error("replayed or too old")]
    Replay,
    /// The tag does not verify: a forged or damaged datagram, or another key. The datagram's
    /// bytes may have changed (the ciphertext is decrypted in place only if it verifies, but
    /// callers should treat the buffer as garbage).
    #[error("authentication failed")]
    Forged,
}

/// The parts of a sealed header an opener needs, read without trusting them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub key_id: u8,
    pub vni: Vni,
    pub counter: u64,
}

impl Header {
    /// Reads the header of a datagram that is long enough and has the S flag.
    pub fn parse(datagram: &[u8]) -> Result<Header, Refused> {
        if datagram.len() < HEADER_LEN + TAG_LEN || !is_sealed(datagram) {
            return Err(Refused::Malformed);
        }
        let v = &datagram[field::VNI];
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&datagram[field::COUNTER]);
        Ok(Header {
            key_id: datagram[field::KEY_ID],
            vni: Vni::from_bytes([v[0], v[1], v[2]]),
            counter: u64::from_be_bytes(counter),
        })
    }

    fn emit(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out.fill(0);
        out[field::FLAGS] = FLAG_SEALED;
        out[field::KEY_ID] = self.key_id;
        out[field::VNI].copy_from_slice(&self.vni.get().to_be_bytes()[1..]);
        out[field::COUNTER].copy_from_slice(&self.counter.to_be_bytes());
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n.into()
}

/// Seals datagrams under one key; shared by every worker (the counter is atomic).
pub struct Sealer {
    aead: ChaCha20Poly1305,
    key_id: u8,
    counter: AtomicU64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer whose counter starts at `start` (see the module doc: the daemon passes
    /// [`clock_counter`]).
    pub fn new(key: &Key, key_id: u8, start: u64) -> Sealer {
        Sealer {
            aead: ChaCha20Poly1305::new(&key.0.into()),
            key_id,
            counter: AtomicU64::new(start),
        }
    }

    /// Takes `n` consecutive counters, the first of which is returned.
    pub fn reserve(&self, n: u64) -> u64 {
        self.counter.fetch_add(n, Relaxed)
    }

    /// Seals `datagram` in place under `counter` (from [`reserve`](Self::reserve)): the frame is
    /// at `datagram[HEADER_LEN..len - TAG_LEN]`; the header and the tag are written around
    /// it. `datagram` must be at least `HEADER_LEN + TAG_LEN` long.
    pub fn seal_with(&self, vni: Vni, counter: u64, datagram: &mut [u8]) {
        let end = datagram.len() - TAG_LEN;
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        Header {
            key_id: self.key_id,
            vni,
            counter,
        }
        .emit(head);
        let (body, tag) = rest.split_at_mut(end - HEADER_LEN);
        // Fails only past ChaCha20's 256 GiB per message.
        if let Ok(t) = self
            .aead
            .encrypt_in_place_detached(&nonce(counter), head, body)
        {
            tag.copy_from_slice(&t);
        }
    }

    /// Seals `datagram` (laid out as for [`seal_with`](Self::seal_with)) under the next counter.
    pub fn seal(&self, vni: Vni, datagram: &mut [u8]) {
        self.seal_with(vni, self.reserve(1), datagram);
    }
}

/// Nanoseconds since the Unix epoch: where a new [`Sealer`]'s counter starts.
pub fn clock_counter() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The counters seen below the highest one, as a bitmap (RFC 6479's sliding window, as
/// WireGuard and IPsec keep it): a counter is new if it is above the highest, or within
/// [`WINDOW`] below it and not yet marked.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// One more than the highest counter taken; 0 before the first.
    next: u64,
    bits: [u64; 32],
}

const WORDS: u64 = 32;

impl Window {
    /// Whether `counter` would be taken (nothing changes).
    pub fn check(&self, counter: u64) -> bool {
        // The one counter after which `next` cannot grow; no sealer gets there (it starts near
        // 2^60 and would need centuries at line rate).
        if counter == u64::MAX {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & bit == 0
    }

    /// Takes `counter` if it is new; false (and nothing changes) if not.
    pub fn take(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // The words past the highest counter's hold bits of counters a whole bitmap ago:
            // clear those the window slides over (all of them at most).
            if self.next > 0 {
                let highest = (self.next - 1) / 64;
                for w in (highest + 1..=counter / 64).take(self.bits.len()) {
                    self.bits[(w % WORDS) as usize] = 0;
                }
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
        true
    }

    fn slot(counter: u64) -> (usize, u64) {
        (((counter / 64) % WORDS) as usize, 1 << (counter % 64))
    }
}

/// Opens datagrams sealed under one key; shared by every worker (the window has a lock, taken
/// twice per datagram and held for a few instructions).
pub struct Opener {
    aead: ChaCha20Poly1305,
    window: Mutex<Window>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new(key: &Key) -> Opener {
        Opener {
            aead: ChaCha20Poly1305::new(&key.0.into()),
            window: Mutex::new(Window::default()),
        }
    }

    /// Opens a sealed datagram in place; returns where the frame now is. The caller has read
    /// `header` with [`Header::parse`] and picked this opener by its VNI, sender and key id.
    pub fn open(&self, header: &Header, datagram: &mut [u8]) -> Result<Range<usize>, Refused> {
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(Refused::Malformed);
        }
        if !self.window().check(header.counter) {
            return Err(Refused::Replay);
        }
        let end = datagram.len() - TAG_LEN;
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(end - HEADER_LEN);
        let tag = Tag::clone_from_slice(tag);
        self.aead
            .decrypt_in_place_detached(&nonce(header.counter), head, body, &tag)
            .map_err(|_| Refused::Forged)?;
        // Another worker may have taken the same counter while this one decrypted.
        if !self.window().take(header.counter) {
            return Err(Refused::Replay);
        }
        Ok(HEADER_LEN..end)
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        // A panic while holding it cannot leave the window inconsistent (no step can panic).
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
