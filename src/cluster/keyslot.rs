//! Hash slots: which of the 16384 slots a key belongs to, exactly as Redis computes it
//! (`keyHashSlot` in Redis `src/cluster.c`: CRC16-XMODEM of the key, or of its first
//! non-empty `{hashtag}`, modulo 16384). Pure; no I/O.

/// Number of hash slots in a Redis Cluster (Redis `src/cluster.h` `CLUSTER_SLOTS`).
pub const SLOTS: usize = 16384;

/// CRC16 with the XMODEM parameters (polynomial 0x1021, initial value 0, no reflection):
/// the checksum Redis `src/crc16.c` implements.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
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

/// The hash slot of `key` (Redis `src/cluster.c` `keyHashSlot`): when the key holds a
/// `{` followed later by a `}` with at least one byte between them, only the bytes
/// between the first `{` and the first `}` after it are hashed.
pub fn key_hash_slot(key: &[u8]) -> u16 {
    let hashed = match memchr::memchr(b'{', key) {
        Some(open) => match memchr::memchr(b'}', &key[open + 1..]) {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) & (SLOTS as u16 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_xmodem_check_value() {
        // The standard check value of CRC-16/XMODEM, as in Redis src/crc16.c's comment.
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn slots_as_redis_computes_them() {
        // Values from `CLUSTER KEYSLOT` of redis-server 7.0.15.
        for (key, slot) in [
            (b"foo".as_slice(), 12182),
            (b"bar", 5061),
            (b"hello", 866),
            (b"", 0),
            (b"{user1000}.following", 3443),
            (b"{user1000}.followers", 3443),
            (b"user1000", 3443),
            // Empty hashtag: the whole key is hashed.
            (b"foo{}{bar}", 8363),
            // Only the first `{...}` counts.
            (b"foo{{bar}}zap", 4015),
            (b"foo{bar}{zap}", 5061),
            // An unclosed `{`: the whole key.
            (b"{abc", 444),
        ] {
            assert_eq!(key_hash_slot(key), slot, "{}", String::from_utf8_lossy(key));
        }
    }
}
