//! The one mapping from PKCS#11 return values to [`Error`], with its policy.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use super::{Error, function_name};

/// The one mapping from cryptoki errors to [`Error`].
///
/// Policy:
/// - SoftHSM reports a failed GCM tag check as `CKR_GENERAL_ERROR` from `C_Decrypt`, and a
///   failed KWP integrity check as `CKR_GENERAL_ERROR` from `C_UnwrapKey`, not as
///   `ENCRYPTED_DATA_INVALID` / `WRAPPED_KEY_INVALID`. So from those two functions, those codes
///   all mean [`Error::Integrity`]: bad input, not a broken HSM. Callers still decrypt a canary
///   before calling input "tampered" (ARCHITECTURE.md), because a sick HSM can fail the same way.
/// - PIN failures are [`Error::Pin`] and never retried: HSMs lock a PIN after a few failures.
/// - Codes that mean the device, token, session or library went away (or a handle went stale
///   with it: SoftHSM invalidates every handle when its token directory disappears) are
///   [`Error::Unavailable`]: retry later, recover without a restart.
/// - Everything else is a bug or a misconfigured token: [`Error::Internal`].
pub fn to_error(error: CkError) -> Error {
    let (rv, function) = match error {
        CkError::Pkcs11(rv, function) => (rv, function),
        CkError::LibraryLoading(error) => return Error::Module(error.to_string()),
        _ => {
            return Error::Internal {
                rv: None,
                function: "cryptoki",
            };
        }
    };
    let decrypting = matches!(function, Function::Decrypt | Function::UnwrapKey);
    let name = function_name(function);
    match rv {
        RvError::GeneralError
        | RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::WrappedKeyInvalid
        | RvError::WrappedKeyLenRange
            if decrypting =>
        {
            Error::Integrity
        }
        RvError::PinIncorrect
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::PinExpired
        | RvError::PinLocked => Error::Pin(rv),
        RvError::GeneralError
        | RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::DeviceRemoved
        | RvError::FunctionFailed
        | RvError::HostMemory
        | RvError::CryptokiNotInitialized
        | RvError::SessionClosed
        | RvError::SessionCount
        | RvError::SessionHandleInvalid
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::UserNotLoggedIn
        | RvError::ObjectHandleInvalid
        | RvError::KeyHandleInvalid
        | RvError::UnwrappingKeyHandleInvalid
        | RvError::WrappingKeyHandleInvalid => Error::Unavailable { rv, function: name },
        _ => Error::Internal {
            rv: Some(rv),
            function: name,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn general_error_means_integrity_only_when_decrypting() {
        assert_eq!(
            to_error(CkError::Pkcs11(RvError::GeneralError, Function::Decrypt)),
            Error::Integrity
        );
        assert_eq!(
            to_error(CkError::Pkcs11(RvError::GeneralError, Function::UnwrapKey)),
            Error::Integrity
        );
        assert!(
            to_error(CkError::Pkcs11(RvError::GeneralError, Function::Encrypt)).is_unavailable()
        );
        assert_eq!(
            to_error(CkError::Pkcs11(RvError::PinIncorrect, Function::Login)),
            Error::Pin(RvError::PinIncorrect)
        );
        assert!(matches!(
            to_error(CkError::Pkcs11(
                RvError::MechanismInvalid,
                Function::EncryptInit
            )),
            Error::Internal { .. }
        ));
    }
}
