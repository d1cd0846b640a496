;; url_check: fetch a URL with the host's http_get and report what came back.
;;
;; Skill ABI v1 (docs/skills.md). The arguments arrive as canonical JSON, which
;; for this skill's schema is always
;;
;;     {"url":"URL"}
;;
;; The schema's pattern keeps quotes, backslashes and whitespace out of URL, so
;; it holds no JSON escapes: its bytes are the URL itself. We hand them to
;; http_get and wrap the host's JSON answer, unchanged, as the result:
;;
;;     {"ok":{"status":200,"content_type":"...","content":"...","truncated":false}}
;;
;; A request that failed comes back the same way, as {"ok":{"error":{...}}}: a
;; result for the model to read, not a fault. A refusal (no http capability,
;; the policy, the SSRF guard) ends the invocation in the host and never
;; returns here.
;;
;; Memory layout: static strings at 16..347, the heap (bump allocator) from 1024.
(module
  (import "goclaw" "http_get"
    (func $http_get (param $url_ptr i32) (param $url_len i32) (result i64)))

  (memory (export "memory") 1)
  (global (export "goclaw_abi") i32 (i32.const 1))

  ;; ---- static data ---------------------------------------------------------
  ;; offset  len  text
  ;;     16    8  {"url":"                           the only input prefix we accept
  ;;     32    6  {"ok":                             the answer follows, then "}"
  ;;     48  125  error: the input is not {"url":"..."}
  ;;    176   81  error: http_get gave no answer
  ;;    272   76  error: no memory left for the answer
  (data (i32.const 16) "{\"url\":\"")
  (data (i32.const 32) "{\"ok\":")
  (data (i32.const 48)
    "{\"error\":{\"code\":\"bad_input\",\"message\":\"the input must be a JSON object whose only field, url, is a string without escapes\"}}")
  (data (i32.const 176)
    "{\"error\":{\"code\":\"no_answer\",\"message\":\"the host gave no answer to the request\"}}")
  (data (i32.const 272)
    "{\"error\":{\"code\":\"out_of_memory\",\"message\":\"no memory left for the answer\"}}")

  ;; The error answers, packed for run to return.
  (func $error_input (result i64) (call $pack (i32.const 48) (i32.const 125)))
  (func $error_no_answer (result i64) (call $pack (i32.const 176) (i32.const 81)))
  (func $error_memory (result i64) (call $pack (i32.const 272) (i32.const 76)))

  ;; ---- bump allocator -------------------------------------------------------
  ;; The next free byte. Nothing is ever freed: a fresh instance serves each call.
  (global $heap_top (mut i32) (i32.const 1024))

  ;; alloc(len) -> a pointer to len fresh bytes, 8-aligned; 0 when memory cannot grow.
  ;; The host calls it too, from inside http_get, for the answer it hands back.
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local $end i64)        ;; one past the block, in i64 so that it cannot wrap
    (local $pages_needed i32)
    (local.set $ptr
      (i32.and (i32.add (global.get $heap_top) (i32.const 7)) (i32.const -8)))
    (local.set $end
      (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $len))))
    ;; Keep clear of the 4 GiB end of the address space.
    (if (i64.gt_u (local.get $end) (i64.const 0xFFFF0000))
      (then (return (i32.const 0))))
    ;; Grow the memory to cover the block if it does not yet.
    (local.set $pages_needed
      (i32.wrap_i64 (i64.shr_u (i64.add (local.get $end) (i64.const 0xFFFF)) (i64.const 16))))
    (if (i32.gt_u (local.get $pages_needed) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages_needed) (memory.size)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap_top (i32.wrap_i64 (local.get $end)))
    (local.get $ptr))

  ;; (ptr << 32) | len: how run hands back its output, and http_get its answer.
  (func $pack (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))

  ;; 1 when the $len bytes at $a and $b are the same.
  (func $bytes_equal (param $a i32) (param $b i32) (param $len i32) (result i32)
    (block $differ
      (loop $next
        (if (i32.eqz (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ
          (i32.ne (i32.load8_u (local.get $a)) (i32.load8_u (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 1)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; ---- run ------------------------------------------------------------------
  (func $run (export "run") (param $input i32) (param $input_len i32) (result i64)
    (local $url i32)          ;; the URL's bytes, inside the input
    (local $url_len i32)
    (local $byte i32)
    (local $reply i64)        ;; http_get's answer, packed
    (local $reply_ptr i32)
    (local $reply_len i32)
    (local $answer i32)

    ;; {"url":" ... "}: at least 10 bytes with the two ends in place.
    (if (i32.lt_u (local.get $input_len) (i32.const 10))
      (then (return (call $error_input))))
    (if (i32.eqz (call $bytes_equal (local.get $input) (i32.const 16) (i32.const 8)))
      (then (return (call $error_input))))
    (if (i32.ne (i32.load16_u (i32.sub (i32.add (local.get $input) (local.get $input_len))
                                       (i32.const 2)))
                (i32.const 0x7D22))                    ;; "} little-endian
      (then (return (call $error_input))))
    (local.set $url (i32.add (local.get $input) (i32.const 8)))
    (local.set $url_len (i32.sub (local.get $input_len) (i32.const 10)))
    (if (i32.eqz (local.get $url_len)) (then (return (call $error_input))))

    ;; No quote or backslash inside: the string really ends where we think.
    (local.set $byte (i32.const 0))
    (block $clean
      (loop $next
        (br_if $clean (i32.ge_u (local.get $byte) (local.get $url_len)))
        (if (i32.or
              (i32.eq (i32.load8_u (i32.add (local.get $url) (local.get $byte))) (i32.const 34))
              (i32.eq (i32.load8_u (i32.add (local.get $url) (local.get $byte))) (i32.const 92)))
          (then (return (call $error_input))))
        (local.set $byte (i32.add (local.get $byte) (i32.const 1)))
        (br $next)))

    ;; The request. The host writes its answer into memory from alloc.
    (local.set $reply (call $http_get (local.get $url) (local.get $url_len)))
    (if (i64.eq (local.get $reply) (i64.const -1))
      (then (return (call $error_no_answer))))
    (local.set $reply_ptr (i32.wrap_i64 (i64.shr_u (local.get $reply) (i64.const 32))))
    (local.set $reply_len (i32.wrap_i64 (local.get $reply)))
    (if (i32.eqz (local.get $reply_len))
      (then (return (call $error_no_answer))))

    ;; {"ok": + the answer + }
    (local.set $answer (call $alloc (i32.add (local.get $reply_len) (i32.const 7))))
    (if (i32.eqz (local.get $answer)) (then (return (call $error_memory))))
    (memory.copy (local.get $answer) (i32.const 32) (i32.const 6))
    (memory.copy (i32.add (local.get $answer) (i32.const 6))
                 (local.get $reply_ptr) (local.get $reply_len))
    (i32.store8 (i32.add (local.get $answer) (i32.add (local.get $reply_len) (i32.const 6)))
                (i32.const 125))                                       ;; }
    (call $pack (local.get $answer) (i32.add (local.get $reply_len) (i32.const 7))))
)
