//! A small, versioned, checksummed byte format shared by the snapshot-able types:
//! `b"SWLY"`, kind tag (u8), format version (u8), body, CRC-32C of everything before it (u32 LE).

use crate::error::{CoreError, CoreResult};
use crate::quant::crc32c;

const MAGIC: &[u8; 4] = b"SWLY";
const VERSION: u8 = 1;

pub(super) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new(kind: u8) -> Self {
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&[kind, VERSION]);
        Writer { buf }
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        let crc = crc32c(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

pub(super) struct Reader<'a> {
    body: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8], kind: u8, what: &'static str) -> CoreResult<Self> {
        let bad = |msg: String| CoreError::BadSnapshot(format!("{what} snapshot: {msg}"));
        if data.len() < MAGIC.len() + 2 + 4 {
            return Err(bad(format!("too short ({} bytes)", data.len())));
        }
        let (content, crc_bytes) = data.split_at(data.len() - 4);
        if &content[..4] != MAGIC {
            return Err(bad("wrong magic; not a Splitwise snapshot".into()));
        }
        if content[4] != kind {
            return Err(bad(format!("holds kind {} but kind {kind} was expected", content[4])));
        }
        if content[5] != VERSION {
            return Err(bad(format!(
                "format version {} is not supported (expected {VERSION})",
                content[5]
            )));
        }
        let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        if crc32c(content) != stored {
            return Err(bad("checksum mismatch; the snapshot is corrupt".into()));
        }
        Ok(Reader {
            body: &content[6..],
            what,
        })
    }

    fn take(&mut self, n: usize) -> CoreResult<&'a [u8]> {
        if self.body.len() < n {
            return Err(CoreError::BadSnapshot(format!(
                "{} snapshot: truncated body",
                self.what
            )));
        }
        let (head, rest) = self.body.split_at(n);
        self.body = rest;
        Ok(head)
    }
    pub fn u64(&mut self) -> CoreResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn i64(&mut self) -> CoreResult<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn f64(&mut self) -> CoreResult<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A length that must fit in what is left of the body, `unit` bytes per element.
    pub fn len(&mut self, unit: usize) -> CoreResult<usize> {
        let n = self.u64()?;
        if n.saturating_mul(unit as u64) > self.body.len() as u64 {
            return Err(CoreError::BadSnapshot(format!(
                "{} snapshot: length {n} exceeds the data",
                self.what
            )));
        }
        Ok(n as usize)
    }
    pub fn str(&mut self) -> CoreResult<String> {
        let n = self.len(1)?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| CoreError::BadSnapshot(format!("{} snapshot: name is not UTF-8", self.what)))
    }
    pub fn finish(self) -> CoreResult<()> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(CoreError::BadSnapshot(format!(
                "{} snapshot: {} trailing bytes",
                self.what,
                self.body.len()
            )))
        }
    }
    pub fn invalid(&self, msg: &str) -> CoreError {
        CoreError::BadSnapshot(format!("{} snapshot: {msg}", self.what))
    }
}
