;; tally: durable named counters, kept in the skill's key-value store.
;;
;; Skill ABI v1 (docs/skills.md). The arguments arrive as canonical JSON (keys
;; sorted, no whitespace), so for this skill's schema one of
;;
;;     {"add":N,"counter":"NAME"}        {"counter":"NAME"}        (add is 1)
;;
;; We read the counter's current value with kv_get (decimal ASCII text; no key
;; means 0), add N, store the sum back with kv_set and answer
;;
;;     {"ok":{"counter":"NAME","value":SUM}}
;;
;; The key is the counter's name itself: each skill has a key space of its own.
;; NAME only holds [A-Za-z0-9_.-], so it is copied into the answer as it is.
;; N may be written 2.0 (JSON Schema counts an integral number as an integer).
;; Values stay within 18 decimal digits (|SUM| < 10^18): no i64 overflow.
;;
;; Memory layout: static strings at 16..1023, the heap (bump allocator) from 1024.
(module
  (import "goclaw" "kv_get"
    (func $kv_get (param $key_ptr i32) (param $key_len i32) (result i64)))
  (import "goclaw" "kv_set"
    (func $kv_set (param $key_ptr i32) (param $key_len i32)
                  (param $val_ptr i32) (param $val_len i32) (result i32)))

  (memory (export "memory") 1)
  (global (export "goclaw_abi") i32 (i32.const 1))

  ;; ---- static data ---------------------------------------------------------
  ;; offset  len  text
  ;;     16    3  add                               the two field names
  ;;     24    7  counter
  ;;     32   18  {"ok":{"counter":"                 the pieces of the answer
  ;;     56   10  ","value":
  ;;     72    2  }}
  ;;    128  124  error: the input is not {"add":N,"counter":"NAME"}
  ;;    256  100  error: a bad counter name
  ;;    384   96  error: add is not an integer in range
  ;;    512   97  error: the stored value is not a number
  ;;    640   96  error: the sum is too large
  ;;    768  123  error: kv_set refused the value
  ;;    896   76  error: no memory left for the answer
  (data (i32.const 16) "add")
  (data (i32.const 24) "counter")
  (data (i32.const 32) "{\"ok\":{\"counter\":\"")
  (data (i32.const 56) "\",\"value\":")
  (data (i32.const 72) "}}")
  (data (i32.const 128)
    "{\"error\":{\"code\":\"bad_input\",\"message\":\"the input must be a JSON object with a string counter and an optional integer add\"}}")
  (data (i32.const 256)
    "{\"error\":{\"code\":\"bad_input\",\"message\":\"counter must be 1 to 64 characters from A-Z a-z 0-9 _ . -\"}}")
  (data (i32.const 384)
    "{\"error\":{\"code\":\"bad_input\",\"message\":\"add must be an integer from -1000000000 to 1000000000\"}}")
  (data (i32.const 512)
    "{\"error\":{\"code\":\"corrupt_value\",\"message\":\"the stored value of this counter is not an integer\"}}")
  (data (i32.const 640)
    "{\"error\":{\"code\":\"overflow\",\"message\":\"the counter would leave the range of 18-digit integers\"}}")
  (data (i32.const 768)
    "{\"error\":{\"code\":\"store_full\",\"message\":\"the key-value store refused to save the counter: this skill holds too many keys\"}}")
  (data (i32.const 896)
    "{\"error\":{\"code\":\"out_of_memory\",\"message\":\"no memory left for the answer\"}}")

  ;; The error answers, packed for run to return.
  (func $error_input (result i64) (call $pack (i32.const 128) (i32.const 124)))
  (func $error_name (result i64) (call $pack (i32.const 256) (i32.const 100)))
  (func $error_add (result i64) (call $pack (i32.const 384) (i32.const 96)))
  (func $error_corrupt (result i64) (call $pack (i32.const 512) (i32.const 97)))
  (func $error_overflow (result i64) (call $pack (i32.const 640) (i32.const 96)))
  (func $error_full (result i64) (call $pack (i32.const 768) (i32.const 123)))
  (func $error_memory (result i64) (call $pack (i32.const 896) (i32.const 76)))

  ;; ---- bump allocator -------------------------------------------------------
  ;; The next free byte. Nothing is ever freed: a fresh instance serves each call.
  (global $heap_top (mut i32) (i32.const 1024))

  ;; alloc(len) -> a pointer to len fresh bytes, 8-aligned; 0 when memory cannot grow.
  ;; The host calls it too, from inside kv_get, for the value it hands back.
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

  ;; (ptr << 32) | len: how run hands back its output, and kv_get its value.
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

  ;; ---- numbers --------------------------------------------------------------
  ;; What the parsers answer for text that is not a number: i64's minimum, which
  ;; every range check below turns away.
  (global $NOT_A_NUMBER i64 (i64.const 0x8000000000000000))
  ;; The largest magnitude a counter may hold: 18 nines.
  (global $VALUE_MAX i64 (i64.const 999999999999999999))

  ;; The integer written in the $len bytes at $ptr: an optional "-" and 1 to 18
  ;; decimal digits. $NOT_A_NUMBER for anything else.
  (func $parse_decimal (param $ptr i32) (param $len i32) (result i64)
    (local $negative i32)
    (local $value i64)
    (local $digit i32)
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0))
                 (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 45)))   ;; -
      (then
        (local.set $negative (i32.const 1))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))))
    (if (i32.or (i32.eqz (local.get $len)) (i32.gt_u (local.get $len) (i32.const 18)))
      (then (return (global.get $NOT_A_NUMBER))))
    (loop $next
      (local.set $digit (i32.sub (i32.load8_u (local.get $ptr)) (i32.const 48)))
      (if (i32.gt_u (local.get $digit) (i32.const 9))
        (then (return (global.get $NOT_A_NUMBER))))
      (local.set $value
        (i64.add (i64.mul (local.get $value) (i64.const 10))
                 (i64.extend_i32_u (local.get $digit))))
      (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
      (local.set $len (i32.sub (local.get $len) (i32.const 1)))
      (br_if $next (local.get $len)))
    (if (result i64) (local.get $negative)
      (then (i64.sub (i64.const 0) (local.get $value)))
      (else (local.get $value))))

  ;; ---- reading the input ----------------------------------------------------
  (global $pos (mut i32) (i32.const 0))   ;; the next input byte
  (global $end (mut i32) (i32.const 0))   ;; one past the last input byte

  ;; If the next input byte is $c, step over it and answer 1; else answer 0.
  (func $accept (param $c i32) (result i32)
    (if (i32.ge_u (global.get $pos) (global.get $end)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load8_u (global.get $pos)) (local.get $c)) (then (return (i32.const 0))))
    (global.set $pos (i32.add (global.get $pos) (i32.const 1)))
    (i32.const 1))

  ;; 1 for the characters a counter's name may hold: A-Z a-z 0-9 _ . -
  (func $is_name_char (param $c i32) (result i32)
    (i32.or
      (i32.or
        (i32.le_u (i32.sub (i32.or (local.get $c) (i32.const 0x20)) (i32.const 97))
                  (i32.const 25))                                       ;; a-z, A-Z
        (i32.le_u (i32.sub (local.get $c) (i32.const 48)) (i32.const 9)))   ;; 0-9
      (i32.or
        (i32.eq (local.get $c) (i32.const 95))                          ;; _
        (i32.le_u (i32.sub (local.get $c) (i32.const 45)) (i32.const 1)))))  ;; - .

  ;; Step over the name characters at the read position; answer how many.
  (func $skip_name (result i32)
    (local $start i32)
    (local.set $start (global.get $pos))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (global.get $pos) (global.get $end)))
        (br_if $done (i32.eqz (call $is_name_char (i32.load8_u (global.get $pos)))))
        (global.set $pos (i32.add (global.get $pos) (i32.const 1)))
        (br $next)))
    (i32.sub (global.get $pos) (local.get $start)))

  ;; The value of add: a JSON number up to the next "," or "}". It must be an
  ;; integer, though it may be written with a fraction of zeros ("2.0").
  (func $read_add (result i64)
    (local $start i32)
    (local $int_end i32)    ;; one past the integer part: the "." or the end
    (local $p i32)
    (local.set $start (global.get $pos))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (global.get $pos) (global.get $end)))
        (br_if $done (i32.eq (i32.load8_u (global.get $pos)) (i32.const 44)))    ;; ,
        (br_if $done (i32.eq (i32.load8_u (global.get $pos)) (i32.const 125)))   ;; }
        (global.set $pos (i32.add (global.get $pos) (i32.const 1)))
        (br $next)))
    ;; Find the "." if there is one.
    (local.set $int_end (local.get $start))
    (block $found
      (loop $next
        (br_if $found (i32.ge_u (local.get $int_end) (global.get $pos)))
        (br_if $found (i32.eq (i32.load8_u (local.get $int_end)) (i32.const 46)))  ;; .
        (local.set $int_end (i32.add (local.get $int_end) (i32.const 1)))
        (br $next)))
    ;; After a "." only zeros, and at least one.
    (if (i32.lt_u (local.get $int_end) (global.get $pos))
      (then
        (local.set $p (i32.add (local.get $int_end) (i32.const 1)))
        (if (i32.ge_u (local.get $p) (global.get $pos))
          (then (return (global.get $NOT_A_NUMBER))))
        (loop $zero
          (if (i32.ne (i32.load8_u (local.get $p)) (i32.const 48))
            (then (return (global.get $NOT_A_NUMBER))))
          (local.set $p (i32.add (local.get $p) (i32.const 1)))
          (br_if $zero (i32.lt_u (local.get $p) (global.get $pos))))))
    (call $parse_decimal (local.get $start)
      (i32.sub (local.get $int_end) (local.get $start))))

  ;; ---- writing --------------------------------------------------------------
  (global $out (mut i32) (i32.const 0))   ;; where the next output byte goes

  (func $put (param $src i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $src) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))

  ;; A signed number in decimal (|n| < 2^63).
  (func $put_i64 (param $n i64)
    (local $digits i32)
    (local $rest i64)
    (local $p i32)
    (if (i64.lt_s (local.get $n) (i64.const 0))
      (then
        (i32.store8 (global.get $out) (i32.const 45))                   ;; -
        (global.set $out (i32.add (global.get $out) (i32.const 1)))
        (local.set $n (i64.sub (i64.const 0) (local.get $n)))))
    ;; Count the digits, then write them from the last one back.
    (local.set $digits (i32.const 1))
    (local.set $rest (local.get $n))
    (block $counted
      (loop $more
        (br_if $counted (i64.lt_u (local.get $rest) (i64.const 10)))
        (local.set $rest (i64.div_u (local.get $rest) (i64.const 10)))
        (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
        (br $more)))
    (local.set $p (i32.add (global.get $out) (local.get $digits)))
    (global.set $out (local.get $p))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48)
          (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $n) (i64.const 0)))))

  ;; ---- run ------------------------------------------------------------------
  (func $run (export "run") (param $input i32) (param $input_len i32) (result i64)
    (local $key i32)          ;; a field name in the input
    (local $key_len i32)
    (local $name i32)         ;; the counter's name (it stays in the input)
    (local $name_len i32)     ;; 0 until the counter field is read
    (local $add i64)
    (local $stored i64)       ;; kv_get's answer
    (local $value i64)        ;; the counter's value, before and after the add
    (local $text i32)         ;; the new value as decimal text
    (local $text_len i32)
    (local $answer i32)
    (global.set $pos (local.get $input))
    (global.set $end (i32.add (local.get $input) (local.get $input_len)))
    (local.set $add (i64.const 1))

    ;; {"key":value,...}: the keys we know are add and counter.
    (if (i32.eqz (call $accept (i32.const 123)))                            ;; {
      (then (return (call $error_input))))
    (loop $field
      (if (i32.eqz (call $accept (i32.const 34))) (then (return (call $error_input))))
      (local.set $key (global.get $pos))
      (local.set $key_len (call $skip_name))
      (if (i32.eqz (call $accept (i32.const 34))) (then (return (call $error_input))))
      (if (i32.eqz (call $accept (i32.const 58))) (then (return (call $error_input))))  ;; :
      (block $read
        (if (i32.and (i32.eq (local.get $key_len) (i32.const 3))
                     (call $bytes_equal (local.get $key) (i32.const 16) (i32.const 3)))
          (then
            ;; add: an integer in [-10^9, 10^9]
            (local.set $add (call $read_add))
            (if (i32.or (i64.lt_s (local.get $add) (i64.const -1000000000))
                        (i64.gt_s (local.get $add) (i64.const 1000000000)))
              (then (return (call $error_add))))
            (br $read)))
        (if (i32.and (i32.eq (local.get $key_len) (i32.const 7))
                     (call $bytes_equal (local.get $key) (i32.const 24) (i32.const 7)))
          (then
            ;; counter: a string of 1 to 64 name characters
            (if (i32.eqz (call $accept (i32.const 34))) (then (return (call $error_name))))
            (local.set $name (global.get $pos))
            (local.set $name_len (call $skip_name))
            (if (i32.eqz (call $accept (i32.const 34))) (then (return (call $error_name))))
            (if (i32.or (i32.eqz (local.get $name_len))
                        (i32.gt_u (local.get $name_len) (i32.const 64)))
              (then (return (call $error_name))))
            (br $read)))
        ;; any other field
        (return (call $error_input)))
      (br_if $field (call $accept (i32.const 44))))                         ;; ,
    (if (i32.eqz (call $accept (i32.const 125))) (then (return (call $error_input))))  ;; }
    (if (i32.ne (global.get $pos) (global.get $end)) (then (return (call $error_input))))
    (if (i32.eqz (local.get $name_len)) (then (return (call $error_input))))  ;; no counter

    ;; The current value: 0 when the store has none.
    (local.set $stored (call $kv_get (local.get $name) (local.get $name_len)))
    (if (i64.ne (local.get $stored) (i64.const -1))
      (then
        (local.set $value
          (call $parse_decimal
            (i32.wrap_i64 (i64.shr_u (local.get $stored) (i64.const 32)))
            (i32.wrap_i64 (local.get $stored))))
        (if (i64.eq (local.get $value) (global.get $NOT_A_NUMBER))
          (then (return (call $error_corrupt))))))

    (local.set $value (i64.add (local.get $value) (local.get $add)))
    (if (i32.or (i64.gt_s (local.get $value) (global.get $VALUE_MAX))
                (i64.lt_s (local.get $value) (i64.sub (i64.const 0) (global.get $VALUE_MAX))))
      (then (return (call $error_overflow))))

    ;; Store the sum as decimal text (at most "-" and 18 digits).
    (local.set $text (call $alloc (i32.const 24)))
    (if (i32.eqz (local.get $text)) (then (return (call $error_memory))))
    (global.set $out (local.get $text))
    (call $put_i64 (local.get $value))
    (local.set $text_len (i32.sub (global.get $out) (local.get $text)))
    (if (call $kv_set (local.get $name) (local.get $name_len)
                      (local.get $text) (local.get $text_len))
      (then (return (call $error_full))))

    ;; {"ok":{"counter":"NAME","value":N}}
    (local.set $answer
      (call $alloc (i32.add (i32.const 32) (i32.add (local.get $name_len) (local.get $text_len)))))
    (if (i32.eqz (local.get $answer)) (then (return (call $error_memory))))
    (global.set $out (local.get $answer))
    (call $put (i32.const 32) (i32.const 18))
    (call $put (local.get $name) (local.get $name_len))
    (call $put (i32.const 56) (i32.const 10))
    (call $put (local.get $text) (local.get $text_len))
    (call $put (i32.const 72) (i32.const 2))
    (call $pack (local.get $answer)
      (i32.sub (global.get $out) (local.get $answer))))
)
