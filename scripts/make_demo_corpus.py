"""Writes configs/demo/corpus.txt: short, noisy, comment-style Korean sentences written for
kormlm's demo (slang, spacing errors, repeated characters, emoji, typos). Deterministic.
The sentences and their variations are original to this project (licence: CC0 1.0)."""
import random

SUBJECTS = ["이 영화", "이 드라마", "배우 연기", "스토리", "결말", "음악", "감독", "주인공", "이번 편", "원작",
            "캐릭터", "대사", "연출", "영상미", "전개", "2편", "예고편", "엔딩", "조연", "편집"]
OPINIONS = ["진짜 재밌다", "너무 지루하다", "완전 최고임", "별로였음", "생각보다 괜찮네", "기대 이하",
            "눈물 났어요", "시간 아까움", "한번 더 보고싶다", "좀 뻔하다", "몰입감 대박", "개연성 없음",
            "소름 돋았다", "웃기긴 한데 유치함", "강추합니다", "비추", "그냥 그럼", "인생작 등극",
            "돈 아깝다", "가족이랑 보기 좋음"]
ENDINGS = ["", "ㅋㅋ", "ㅋㅋㅋㅋ", "ㅎㅎ", "ㅠㅠ", "ㅜㅜ", "!!", "...", "~", "ㄹㅇ", "인정", "ㅇㅈ", "😂", "👍", "🔥", "😭"]
SLANG = {"진짜": ["진짜", "찐", "진쨔", "레알"], "너무": ["너무", "넘", "너무너무", "넘나"], "완전": ["완전", "완젼", "왕"],
         "재밌다": ["재밌다", "재밋다", "잼있다", "꿀잼"], "별로였음": ["별로였음", "별루였음", "별로엿음"]}


def noisy(sentence, rng):
    for word, options in SLANG.items():
        if word in sentence and rng.random() < 0.5:
            sentence = sentence.replace(word, rng.choice(options), 1)
    if rng.random() < 0.3:  # spacing errors
        sentence = sentence.replace(" ", "", rng.randint(1, 2))
    if rng.random() < 0.2:  # repeated characters
        i = rng.randrange(len(sentence))
        sentence = sentence[:i] + sentence[i] * rng.randint(2, 4) + sentence[i + 1:]
    return sentence


def main():
    rng = random.Random(2026)
    seen, lines = set(), []
    while len(lines) < 3000:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(OPINIONS)} {rng.choice(ENDINGS)}".strip()
        if rng.random() < 0.35:
            s = f"{s} {rng.choice(SUBJECTS)}도 {rng.choice(OPINIONS)}"
        s = noisy(s, rng)
        if s not in seen:
            seen.add(s)
            lines.append(s)
    with open("configs/demo/corpus.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
