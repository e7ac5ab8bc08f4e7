//! Published test vectors: RFC 8032 section 7.1 (Ed25519) through the same verifier the
//! envelopes use, and the DSSE v1 PAE example.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha512};

struct Vector {
    secret: &'static str,
    public: &'static str,
    message: Vec<u8>,
    signature: &'static str,
}

fn vectors() -> Vec<Vector> {
    vec![
        // TEST 1 (empty message)
        Vector {
            secret: "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            public: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            message: vec![],
            signature: "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        },
        // TEST 2
        Vector {
            secret: "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            public: "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            message: vec![0x72],
            signature: "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        },
        // TEST 3
        Vector {
            secret: "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            public: "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            message: vec![0xaf, 0x82],
            signature: "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        },
        // TEST SHA(abc): the message is the 64-byte SHA-512 of "abc".
        Vector {
            secret: "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
            public: "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
            message: Sha512::digest(b"abc").to_vec(),
            signature: "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
        },
    ]
}

fn arr<const N: usize>(h: &str) -> [u8; N] {
    hex::decode(h).unwrap().try_into().unwrap()
}

#[test]
fn rfc8032_ed25519_vectors() {
    for (i, v) in vectors().iter().enumerate() {
        let sk = SigningKey::from_bytes(&arr(v.secret));
        assert_eq!(
            hex::encode(sk.verifying_key().as_bytes()),
            v.public,
            "vector {i}"
        );
        let sig = sk.sign(&v.message);
        assert_eq!(hex::encode(sig.to_bytes()), v.signature, "vector {i}");
        let vk = VerifyingKey::from_bytes(&arr(v.public)).unwrap();
        let sig = Signature::from_bytes(&arr(v.signature));
        vk.verify_strict(&v.message, &sig).unwrap();
        // One flipped bit in the message, the signature or the key: refused.
        let mut m = v.message.clone();
        m.push(0);
        assert!(vk.verify_strict(&m, &sig).is_err(), "vector {i}");
        let mut s = sig.to_bytes();
        s[5] ^= 1;
        assert!(
            vk.verify_strict(&v.message, &Signature::from_bytes(&s))
                .is_err()
        );
        let mut k: [u8; 32] = arr(v.public);
        k[3] ^= 1;
        if let Ok(k) = VerifyingKey::from_bytes(&k) {
            assert!(k.verify_strict(&v.message, &sig).is_err());
        }
    }
}

#[test]
fn dsse_pae_vector() {
    assert_eq!(
        felhom_authz::pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    );
}
