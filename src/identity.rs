//! A box's identity: a self-signed certificate and its key, and the device ID derived from it
//! (SHA-256 of the certificate, shown as base32 in groups with Luhn check characters, as Syncthing
//! does, so a mistyped ID is caught before it is pinned).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// SHA-256 of a box's DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("device ID must have 56 base32 characters (A-Z, 2-7) in 8 groups, got {0}")]
    Length(usize),
    #[error("device ID has a character that is not base32: {0:?}")]
    Char(char),
    #[error("device ID check character wrong in group {0}: mistyped?")]
    Check(usize),
}

impl DeviceId {
    pub fn from_cert_der(der: &[u8]) -> Self {
        DeviceId(Sha256::digest(der).into())
    }

    /// First 64 bits: the key of this device in version vectors.
    pub fn short(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().unwrap_or([0; 8]))
    }

    /// First group of the printed ID, used in conflict file names and logs.
    pub fn short_str(&self) -> String {
        self.to_string()[..7].to_string()
    }
}

fn luhn32(s: &[u8]) -> u8 {
    // Luhn mod N over the base32 alphabet, as Syncthing's device IDs.
    let n = 32u32;
    let mut factor = 1u32;
    let mut sum = 0u32;
    for &c in s {
        let cp = B32.iter().position(|&b| b == c).unwrap_or(0) as u32;
        let mut addend = factor * cp;
        factor = if factor == 2 { 1 } else { 2 };
        addend = addend / n + addend % n;
        sum += addend;
    }
    let remainder = sum % n;
    let check = (n - remainder) % n;
    B32[check as usize]
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = data_encoding::BASE32_NOPAD.encode(&self.0); // 52 chars
        let raw = raw.as_bytes();
        let mut with_check = Vec::with_capacity(56);
        for chunk in raw.chunks(13) {
            with_check.extend_from_slice(chunk);
            with_check.push(luhn32(chunk));
        }
        let groups: Vec<&str> = with_check
            .chunks(7)
            .map(|c| std::str::from_utf8(c).unwrap_or("?"))
            .collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short_str())
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let cleaned: Vec<u8> = s
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != ' ')
            .map(|c| c.to_ascii_uppercase())
            .map(|c| {
                if c.is_ascii() {
                    Ok(c as u8)
                } else {
                    Err(IdError::Char(c))
                }
            })
            .collect::<Result<_, _>>()?;
        if cleaned.len() != 56 {
            return Err(IdError::Length(cleaned.len()));
        }
        if let Some(&c) = cleaned.iter().find(|c| !B32.contains(c)) {
            return Err(IdError::Char(c as char));
        }
        let mut raw = Vec::with_capacity(52);
        for (i, chunk) in cleaned.chunks(14).enumerate() {
            if luhn32(&chunk[..13]) != chunk[13] {
                return Err(IdError::Check(i + 1));
            }
            raw.extend_from_slice(&chunk[..13]);
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(&raw)
            .map_err(|_| IdError::Length(raw.len()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdError::Length(56))?;
        Ok(DeviceId(arr))
    }
}

/// Certificate and private key of this box (DER).
pub struct Identity {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub id: DeviceId,
}

impl Identity {
    pub fn generate() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec!["mybox".to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mybox");
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(4000, 1, 1);
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        Ok(Identity {
            id: DeviceId::from_cert_der(&cert_der),
            cert_der,
            key_der: key.serialize_der(),
        })
    }

    /// Write cert and key as PEM; the key (and the cert, for symmetry) with mode 0600.
    /// Refuses to overwrite an existing identity.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if cert_path.exists() || key_path.exists() {
            bail!(
                "an identity already exists at {}: refusing to overwrite it",
                cert_path.display()
            );
        }
        let cert_pem = pem_encode("CERTIFICATE", &self.cert_der);
        let key_pem = pem_encode("PRIVATE KEY", &self.key_der);
        for (path, body) in [(key_path, key_pem), (cert_path, cert_pem)] {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
        }
        Ok(())
    }

    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read_to_string(cert_path)
            .with_context(|| format!("reading certificate {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(key_path)
            .with_context(|| format!("reading key {}", key_path.display()))?;
        let cert_der = pem_decode(&cert_pem, "CERTIFICATE")
            .with_context(|| format!("bad certificate in {}", cert_path.display()))?;
        let key_der = pem_decode(&key_pem, "PRIVATE KEY")
            .with_context(|| format!("bad key in {}", key_path.display()))?;
        Ok(Identity {
            id: DeviceId::from_cert_der(&cert_der),
            cert_der,
            key_der,
        })
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or(""));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(pem: &str, label: &str) -> anyhow::Result<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).context("no BEGIN line")? + begin.len();
    let stop = pem[start..].find(&end).context("no END line")? + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    Ok(data_encoding::BASE64.decode(body.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_roundtrip_and_check() {
        let id = DeviceId([7u8; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 56 + 7);
        assert_eq!(s.parse::<DeviceId>().unwrap(), id);
        assert_eq!(s.to_lowercase().parse::<DeviceId>().unwrap(), id);
        // One character changed is caught by the check character.
        let mut bad: Vec<char> = s.chars().collect();
        bad[2] = if bad[2] == 'A' { 'B' } else { 'A' };
        let bad: String = bad.into_iter().collect();
        assert!(bad.parse::<DeviceId>().is_err());
        assert!("hello".parse::<DeviceId>().is_err());
        assert!("".parse::<DeviceId>().is_err());
        assert!(s.replace('A', "1").parse::<DeviceId>().is_err() || !s.contains('A'));
    }

    #[test]
    fn generate_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let ident = Identity::generate().unwrap();
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        ident.save(&c, &k).unwrap();
        assert!(ident.save(&c, &k).is_err(), "must refuse to overwrite");
        let back = Identity::load(&c, &k).unwrap();
        assert_eq!(back.id, ident.id);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
